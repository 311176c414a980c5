"""Memory of a stateless API node (``underpaint serve --no-worker``): RSS and whether torch is loaded.

Method: start the node as a real process on a models folder with one placeholder SD 1.5 checkpoint and one
ControlNet (the registry reads their keys; no weights are loaded on an API node), submit one task with a
ControlNet unit (the submit path that used to import the engine's preprocessors), poll task-result 200 times and
list /v3/model, then read ``VmRSS`` and the mapped shared libraries from ``/proc/<pid>``. With ``--before SRC``
the same is measured, in the same run, for another source tree (e.g. a checkout of the commit before the
redesign), for a ratio.

Pass: RSS < 200 MB and no torch / cuDNN / onnxruntime library mapped.

    .venv/bin/python bench/api_node_memory.py [--before /path/to/old/src]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.api import write_models

LIMIT_MB = 200.0
HEAVY_LIBS = ("torch", "cudnn", "onnxruntime")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(src: Path, work: Path) -> tuple[float, list[str]]:
    """(RSS in MB, heavy libraries mapped) of an API node running the code in ``src``."""
    port = _port()
    env = {**os.environ, "PYTHONPATH": str(src), "UNDERPAINT_API_KEYS": "k", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "underpaint.cli", "serve", "--no-worker", "--port", str(port),
           "--data-dir", str(work / "data"), "--models-dir", str(write_models(work / "models"))]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the API node did not start")
            time.sleep(0.2)
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 20, 200)).save(buf, "PNG")
        image = base64.b64encode(buf.getvalue()).decode()
        unit = {"model_name": "control_v11p_sd15_canny", "image_base64": image, "preprocessor": "canny"}
        body = {"request": {"model_name": "dreamshaper_8.safetensors", "image_base64": image, "prompt": "p",
                            "controlnet": {"units": [unit]}}}  # fmt: skip
        r = httpx.post(url + "/v3/async/img2img", json=body, headers=headers, timeout=60)
        r.raise_for_status()
        for _ in range(200):
            httpx.get(url + "/v3/async/task-result", params={"task_id": r.json()["task_id"]}, headers=headers)
        httpx.get(url + "/v3/model", headers=headers).raise_for_status()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
        maps = {line.split()[-1] for line in Path(f"/proc/{proc.pid}/maps").read_text().splitlines() if ".so" in line}
        heavy = sorted({Path(m).name for m in maps if any(h in m for h in HEAVY_LIBS)})
        return rss, heavy
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, help="another source tree (its src/ folder) to measure too")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1] / "src"
    with tempfile.TemporaryDirectory() as tmp:
        rss, heavy = measure(here, Path(tmp) / "now")
        print(f"this tree: RSS {rss:.0f} MB, heavy libraries mapped: {len(heavy)} {heavy[:3]}")
        if args.before is not None:
            before, before_heavy = measure(args.before, Path(tmp) / "before")
            print(f"before:    RSS {before:.0f} MB, heavy libraries mapped: {len(before_heavy)} {before_heavy[:3]}")
            print(f"ratio (this tree / before): {rss / before:.3f}")
    ok = rss < LIMIT_MB and not heavy
    print(f"{'PASS' if ok else 'FAIL'}: RSS {rss:.0f} MB (limit {LIMIT_MB:.0f}), torch-free: {not heavy}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
