"""A real ``underpaint serve`` process on a free loopback port, for SDK and durability tests."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image
from tests.support.ports import free_port


class PortTaken(RuntimeError):
    """The server could not bind its port: another process took it after ``free_port`` picked it."""


class LiveServer:
    def __init__(
        self,
        data_dir: Path,
        models_dir: Path,
        keys: str = "key-a,key-b",
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.args = args
        self.data_dir = data_dir
        self.models_dir = models_dir
        self.keys = keys
        self.port_given = port is not None
        self.port = port or free_port()
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> LiveServer:
        """Start and wait for ``/health``; a server that lost its port to another process (pytest-xdist workers and
        other sessions pick ports concurrently) is started again on a new one, unless the port was given."""
        for _ in range(3):
            try:
                return self._start(timeout)
            except PortTaken:
                if self.port_given:
                    raise
                self.port = free_port()
                self.log_path = self.data_dir / f"server-{self.port}.log"
        return self._start(timeout)

    def _start(self, timeout: float) -> LiveServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "UNDERPAINT_API_KEYS": self.keys,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"),
            **self.extra_env,
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "underpaint.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--models-dir",
                str(self.models_dir),
                "--torch-threads",
                "1",
                *self.args,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-4000:]
                if "address already in use" in tail.lower():
                    raise PortTaken(self.port)
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log_path.read_text()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run, as in a crash or power loss."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def make_png(size: tuple[int, int] = (96, 80), seed: int = 0) -> bytes:
    """A deterministic colourful test picture (not a flat colour, so the VAE has something to encode)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=-1)
    arr = (arr + rng.integers(0, 32, arr.shape)).clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
