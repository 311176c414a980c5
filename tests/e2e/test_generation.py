"""The whole stack in one process (API in-process, worker driven step by step) on tiny models."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from tests.support.in_process import in_process
from tests.support.server import make_png

from underpaint.engine.metadata import read_infotext

A = {"Authorization": "Bearer key-a"}


class Stack:
    def __init__(self, client: TestClient, worker: Any, services: Any) -> None:
        self.client = client
        self.worker = worker
        self.services = services

    def submit(self, **request: Any) -> str:
        extra = request.pop("extra", {})
        body = {
            "extra": extra,
            "request": {
                "model_name": "tiny-sd15.safetensors",
                "image_base64": base64.b64encode(make_png()).decode(),
                "prompt": "a red house",
                "width": 128,
                "height": 128,
                "image_num": 1,
                "steps": 5,
                "seed": 77,
                "guidance_scale": 6.0,
                "sampler_name": "Euler a",
                "strength": 0.7,
                **request,
            },
        }
        r = self.client.post("/v3/async/img2img", json=body, headers=A)
        assert r.status_code == 200, r.text
        return str(r.json()["task_id"])

    def run(self, task_id: str) -> dict[str, Any]:
        assert self.worker.run_once()
        r = self.client.get("/v3/async/task-result", params={"task_id": task_id}, headers=A)
        assert r.status_code == 200
        return dict(r.json())

    def images(self, result: dict[str, Any]) -> list[bytes]:
        out = []
        for img in result["images"]:
            r = self.client.get(img["image_url"])  # no auth header: signed URL
            assert r.status_code == 200
            out.append(r.content)
        return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Stack]:
    with in_process(tmp_path_factory.mktemp("data"), tiny_models_dir) as running:
        yield Stack(running.client, running.worker, running.services)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def test_same_seed_same_pixels_and_size(stack: Stack) -> None:
    a = stack.run(stack.submit(seed=5, width=192, height=128))
    b = stack.run(stack.submit(seed=5, width=192, height=128))
    c = stack.run(stack.submit(seed=6, width=192, height=128))
    assert a["task"]["status"] == "TASK_STATUS_SUCCEED", a["task"]
    (ia,), (ib,), (ic,) = stack.images(a), stack.images(b), stack.images(c)
    assert pixels(ia).shape == (128, 192, 3)
    assert np.array_equal(pixels(ia), pixels(ib))
    assert not np.array_equal(pixels(ia), pixels(ic))
    assert a["extra"]["seed"] == "5"


def test_image_num_uses_consecutive_seeds(stack: Stack) -> None:
    batch = stack.images(stack.run(stack.submit(seed=1000, image_num=4, sampler_name="DPM++ SDE")))
    assert len(batch) == 4
    for i, data in enumerate(batch):
        (single,) = stack.images(stack.run(stack.submit(seed=1000 + i, sampler_name="DPM++ SDE")))
        diff = np.abs(pixels(data) - pixels(single))
        assert diff.max() <= 1, f"image {i} differs from the single run with seed {1000 + i} by {diff.max()}"


def test_random_seed_is_reported_and_reproducible(stack: Stack) -> None:
    first = stack.run(stack.submit(seed=-1))
    seed = int(first["extra"]["seed"])
    assert 0 <= seed < 2**32
    again = stack.run(stack.submit(seed=seed))
    assert np.array_equal(pixels(stack.images(first)[0]), pixels(stack.images(again)[0]))


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_output_formats_carry_infotext(stack: Stack, fmt: str) -> None:
    result = stack.run(stack.submit(extra={"response_image_type": fmt}, clip_skip=2, prompt="(a house:1.2)"))
    (data,) = stack.images(result)
    assert result["images"][0]["image_type"] == fmt
    assert Image.open(io.BytesIO(data)).format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[fmt]
    info = read_infotext(data)
    assert info is not None
    assert info.startswith("(a house:1.2)")
    assert "Sampler: Euler a" in info
    assert "Seed: 77" in info
    assert "Clip skip: 2" in info
    assert "Denoising strength: 0.7" in info


def test_progress_and_eta_move_during_sampling(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []
    store = stack.services.store
    original = store.update_progress

    def spy(task_id: str, worker_id: str, progress_percent: int, eta: int) -> bool:
        seen.append((progress_percent, eta))
        return bool(original(task_id, worker_id, progress_percent, eta))

    monkeypatch.setattr(store, "update_progress", spy)
    stack.run(stack.submit(steps=40, strength=1.0, sampler_name="Heun"))
    progress = [p for p, _ in seen]
    assert len(set(progress)) >= 3, seen
    assert progress == sorted(progress)
    assert seen[0][1] >= seen[-2][1]


def test_every_sampler_name_runs(stack: Stack) -> None:
    from underpaint.engine.samplers import SAMPLER_NAMES

    ids = [stack.submit(sampler_name=name, steps=3, width=128, height=128) for name in SAMPLER_NAMES]
    for task_id, name in zip(ids, SAMPLER_NAMES, strict=True):
        result = stack.run(task_id)
        assert result["task"]["status"] == "TASK_STATUS_SUCCEED", (name, result["task"])


def test_missing_checkpoint_at_run_time_fails_with_reason(stack: Stack, tiny_models_dir: Path, tmp_path: Path) -> None:
    import shutil

    src = tiny_models_dir / "checkpoint" / "tiny-sd15.safetensors"
    copy = tiny_models_dir / "checkpoint" / "doomed.safetensors"
    shutil.copy(src, copy)
    side = tiny_models_dir / "checkpoint" / "tiny-sd15.config"
    shutil.copytree(side, tiny_models_dir / "checkpoint" / "doomed.config")
    task_id = stack.submit(model_name="doomed.safetensors")
    copy.unlink()
    shutil.rmtree(tiny_models_dir / "checkpoint" / "doomed.config")
    result = stack.run(task_id)
    assert result["task"]["status"] == "TASK_STATUS_FAILED"
    assert "doomed" in result["task"]["reason"]


def test_sd_vae_applies_to_its_task_only(stack: Stack) -> None:
    (base,) = stack.images(stack.run(stack.submit(seed=9)))
    with_vae = stack.run(stack.submit(seed=9, sd_vae="tiny-vae.safetensors"))
    (vae_img,) = stack.images(with_vae)
    (after,) = stack.images(stack.run(stack.submit(seed=9)))
    assert not np.array_equal(pixels(base), pixels(vae_img))
    assert np.array_equal(pixels(base), pixels(after)), "the override must not leak into later tasks"
    info = read_infotext(vae_img)
    assert info is not None
    assert "VAE: tiny-vae.safetensors" in info


def test_long_prompt_and_weights_change_the_image(stack: Stack) -> None:
    base = pixels(stack.images(stack.run(stack.submit(seed=3, prompt="a red house")))[0])
    weighted = pixels(stack.images(stack.run(stack.submit(seed=3, prompt="a (red:1.5) house")))[0])
    long_prompt = "a red house, " + ", ".join(f"detail {i}" for i in range(60))
    long_img = pixels(stack.images(stack.run(stack.submit(seed=3, prompt=long_prompt)))[0])
    assert not np.array_equal(base, weighted)
    assert not np.array_equal(base, long_img)


def submit_txt2img(stack: Stack, **request: Any) -> str:
    body = {"request": {"model_name": "tiny-sdxl.safetensors", "prompt": "a red house", "width": 128, "height": 128,
                        "steps": 4, "seed": 31, "sampler_name": "Euler", **request}}  # fmt: skip
    r = stack.client.post("/v3/async/txt2img", json=body, headers=A)
    assert r.status_code == 200, r.text
    return str(r.json()["task_id"])


@pytest.mark.slow
def test_txt2img_with_refiner_and_a_model_upscaler_hires_fix(stack: Stack) -> None:
    """Over HTTP: the refiner found by its name (no setting, no ``refiner.model_name``), a hires fix through an
    upscaler model, the task-result type, and the infotext of both."""
    task_id = submit_txt2img(
        stack,
        refiner={"switch_at": 0.5},
        hires_fix={
            "target_width": 192,
            "target_height": 160,
            "strength": 0.5,
            "upscaler": "RealESRGAN_x4plus_anime_6B",
        },
    )
    result = stack.run(task_id)
    assert result["task"]["status"] == "TASK_STATUS_SUCCEED", result["task"]
    assert result["task"]["task_type"] == "TXT_TO_IMG"
    (png,) = stack.images(result)
    assert Image.open(io.BytesIO(png)).size == (192, 160)
    info = read_infotext(png)
    assert info is not None
    assert "Refiner: tiny-sdxl-refiner" in info
    assert "Refiner switch at: 0.5" in info
    assert "Hires upscaler: RealESRGAN_x4plus_anime_6B" in info
    assert "Hires resize: 192x160" in info
