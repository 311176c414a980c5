"""``POST /v3/async/upscale`` through the whole stack (API in-process, worker driven step by step) on the demo
upscalers: sizes and pixels agree with spandrel running the same model on the same tiles, ``scale_factor`` "2"
works, and bad input is a 400 naming the field, never a 500."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import spandrel
import torch
from fastapi.testclient import TestClient
from PIL import Image
from tests.support.in_process import in_process

from underpaint.engine.metadata import read_infotext

A = {"Authorization": "Bearer key-a"}


def _png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((width, height), Image.Resampling.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


class Stack:
    def __init__(self, client: TestClient, worker: Any) -> None:
        self.client = client
        self.worker = worker

    def post(self, extra: dict[str, Any] | None = None, **request: Any) -> Any:
        body = {"extra": extra or {}, "request": request}
        return self.client.post("/v3/async/upscale", json=body, headers=A)

    def submit(self, **request: Any) -> str:
        r = self.post(**request)
        assert r.status_code == 200, r.text
        return str(r.json()["task_id"])

    def run(self, task_id: str) -> dict[str, Any]:
        assert self.worker.run_once()
        r = self.client.get("/v3/async/task-result", params={"task_id": task_id}, headers=A)
        assert r.status_code == 200
        return dict(r.json())

    def image(self, result: dict[str, Any]) -> bytes:
        (img,) = result["images"]
        r = self.client.get(img["image_url"])
        assert r.status_code == 200
        return bytes(r.content)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Path:
    """The demo upscalers plus files an upscaler folder can hold by mistake."""
    root = tmp_path_factory.mktemp("upscale-models")
    shutil.copytree(tiny_models_dir / "upscaler", root / "upscaler")
    (root / "upscaler" / "download-failed.pth").write_bytes(b"<html>403 Forbidden</html>")
    torch.save({"params": {"body.0.weight": torch.zeros(1)}, "hook": print}, root / "upscaler" / "has-code.pth")
    safetensors.torch.save_file(
        {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(root / "upscaler" / "a-vae.safetensors")
    )
    shutil.copy(tiny_models_dir / "lora" / "tiny-style-sd15.safetensors", root / "upscaler" / "a-lora.safetensors")
    safetensors.torch.save_file(  # weights whose names say nothing certain: only spandrel can tell
        {"head.proj.weight": torch.zeros(4, 3, 3, 3)}, str(root / "upscaler" / "unknown-arch.safetensors")
    )
    return root


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[Stack]:
    with in_process(tmp_path_factory.mktemp("data"), models) as running:
        yield Stack(running.client, running.worker)


def _spandrel_extras(data: bytes, model_file: Path, scale: float) -> np.ndarray:
    """The outside reference: spandrel's own loader and model, A1111's Extras loop, one tile (the images here are
    smaller than 192 px, so the server runs one window per pass too)."""
    model = spandrel.ModelLoader().load_from_file(model_file).eval()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    for _ in range(3):
        if image.width >= dest[0] and image.height >= dest[1]:
            break
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.inference_mode():
            y = model(x)[0].permute(1, 2, 0).numpy()
        image = Image.fromarray(np.clip(255.0 * y, 0, 255).astype(np.uint8))
    if image.size != dest:
        image = image.resize(dest, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    ("model_name", "file", "scale", "size"),
    [
        ("RealESRGAN_x4plus_anime_6B", "RealESRGAN_x4plus_anime_6B.pth", "2", (120, 80)),  # the JS example's string
        ("RealESRNet_x4plus", "RealESRNet_x4plus.pth", 3.3, (192, 128)),  # 198 x 132 floored to 8s
        ("2x-tiny-compact", "2x-tiny-compact.pth", 2.5, (144, 96)),  # two passes of a 2x model, then Lanczos
    ],
)
def test_upscale_over_http_matches_spandrel(
    stack: Stack, models: Path, model_name: str, file: str, scale: Any, size: tuple[int, int]
) -> None:
    png = _png(60, 40)
    result = stack.run(
        stack.submit(model_name=model_name, image_base64=base64.b64encode(png).decode(), scale_factor=scale)
    )
    assert result["task"]["status"] == "TASK_STATUS_SUCCEED", result["task"]
    assert result["task"]["task_type"] == "UPSCALE"
    assert result["images"][0]["image_type"] == "png"
    data = stack.image(result)
    got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    expected = _spandrel_extras(png, models / "upscaler" / file, float(scale))
    assert got.shape == (size[1], size[0], 3) == expected.shape
    assert np.abs(got - expected).max() <= 1
    assert read_infotext(data) == f"Postprocess upscale by: {float(scale):g}, Postprocess upscaler: {model_name}"


def test_output_format_and_webhook_payload_shape(stack: Stack) -> None:
    png = base64.b64encode(_png(40, 40)).decode()
    r = stack.post({"response_image_type": "webp"}, model_name="2x-tiny-compact", image_base64=png, scale_factor=2)
    assert r.status_code == 200, r.text
    result = stack.run(r.json()["task_id"])
    assert result["images"][0]["image_type"] == "webp"
    assert Image.open(io.BytesIO(stack.image(result))).size == (80, 80)
    assert result["task"]["progress_percent"] == 100
    assert result["extra"]["seed"] == "0"  # an upscale has no seed


@pytest.mark.parametrize(
    ("request_fields", "field", "reason", "message"),
    [
        ({"scale_factor": 5}, "request.scale_factor", "INVALID_REQUEST_BODY", "greater than 1 and at most 4"),
        ({"scale_factor": 1}, "request.scale_factor", "INVALID_REQUEST_BODY", "greater than 1 and at most 4"),
        ({"scale_factor": "abc"}, "request.scale_factor", "INVALID_REQUEST_BODY", "must be a number"),
        ({"scale_factor": None}, "request.scale_factor", "INVALID_REQUEST_BODY", "is required"),
        ({"model_name": "4x-UltraSharp"}, "request.model_name", "INVALID_REQUEST_BODY", "unknown upscaler"),
        ({"model_name": "download-failed"}, "request.model_name", "INVALID_REQUEST_BODY", "neither a safetensors"),
        ({"model_name": "has-code"}, "request.model_name", "INVALID_REQUEST_BODY", "names code (__builtin__.print)"),
        (
            {"model_name": "a-vae"},
            "request.model_name",
            "INVALID_REQUEST_BODY",
            "upscaler 'a-vae' cannot be loaded: a-vae.safetensors holds a VAE's tensors, not an upscaler's (it belongs "
            "in models/vae/)",
        ),
        ({"model_name": "a-lora"}, "request.model_name", "INVALID_REQUEST_BODY", "holds a LoRA's tensors"),
        ({"image_base64": "bm90IGFuIGltYWdl"}, "request.image_base64", "INVALID_IMAGE_FORMAT", "not a readable"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    stack: Stack, request_fields: dict[str, Any], field: str, reason: str, message: str
) -> None:
    request = {
        "model_name": "RealESRGAN_x4plus_anime_6B",
        "image_base64": base64.b64encode(_png(32, 32)).decode(),
        "scale_factor": 2,
        **request_fields,
    }
    r = stack.post(**request)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["reason"] == reason
    assert body["metadata"]["field"] == field
    assert message in body["message"]


def test_a_result_under_8_px_is_refused_at_submit(stack: Stack) -> None:
    r = stack.post(model_name="2x-tiny-compact", image_base64=base64.b64encode(_png(5, 40)).decode(), scale_factor=1.5)
    assert r.status_code == 400, r.text
    assert r.json()["metadata"]["field"] == "request.scale_factor"
    assert "5x40 upscaled by 1.5 is 0x56" in r.json()["message"]


def test_an_8_megapixel_image_is_refused_before_it_is_decoded(stack: Stack) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (3464, 2309), (40, 90, 160)).save(buf, "PNG")
    r = stack.post(
        model_name="RealESRNet_x4plus", image_base64=base64.b64encode(buf.getvalue()).decode(), scale_factor=4
    )
    assert r.status_code == 400, r.text
    assert r.json()["reason"] == "IMAGE_EXCEEDS_MAX_RESOLUTION"
    assert "exceeds the maximum of 2048x2048" in r.json()["message"]


def test_a_file_spandrel_does_not_recognise_fails_the_task_naming_it(stack: Stack) -> None:
    """Readable weights whose tensor names fit no kind the registry knows: the API cannot tell without torch, the
    worker fails the task with spandrel's verdict (never a 500, never a stuck task)."""
    png = base64.b64encode(_png(32, 32)).decode()
    result = stack.run(stack.submit(model_name="unknown-arch", image_base64=png, scale_factor="1.5"))
    assert result["task"]["status"] == "TASK_STATUS_FAILED"
    assert "unknown-arch.safetensors: not a model architecture spandrel recognises" in result["task"]["reason"]
    ok = stack.run(stack.submit(model_name="2x-tiny-compact", image_base64=png, scale_factor="1.5"))
    assert ok["task"]["status"] == "TASK_STATUS_SUCCEED"  # the worker goes on
