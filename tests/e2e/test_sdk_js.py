"""The official JS SDK (novita-sdk 3.1.3, setBaseUrl, bare-key auth) against a live server."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from pathlib import Path

import httpx
from PIL import Image
from tests.support.server import LiveServer

JS_DIR = Path(__file__).resolve().parents[1] / "js"


def test_js_sdk_img2img_txt2img_poll_and_list(live_server: LiveServer, tmp_path: Path, png_b64: str) -> None:
    node = shutil.which("node")
    assert node, "node is required for the JS SDK test"
    assert (JS_DIR / "node_modules" / "novita-sdk").is_dir(), "run scripts/bootstrap (npm install in tests/js)"
    image_file = tmp_path / "img.b64"
    image_file.write_text(png_b64)
    out = subprocess.run(
        [node, str(JS_DIR / "sdk_flow.js"), live_server.url, "key-b", "tiny-sd15", str(image_file)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    progress = result["progress"]
    assert progress["task"]["status"] == "TASK_STATUS_SUCCEED", progress["task"]
    assert progress["task"]["task_type"] == "IMG_TO_IMG"
    assert len(progress["images"]) == 1
    assert progress["images"][0]["image_url"].startswith("http://127.0.0.1")
    txt2img = result["txt2imgProgress"]
    assert txt2img["task"]["status"] == "TASK_STATUS_SUCCEED", txt2img["task"]
    assert txt2img["task"]["task_type"] == "TXT_TO_IMG"
    assert len(txt2img["images"]) == 1
    assert any(m["sd_name"] == "tiny-sd15.safetensors" for m in result["models"]["models"])
    assert result["error"]["code"] == 404
    assert result["error"]["reason"] == "TASK_NOT_FOUND"


def test_js_sdk_inpainting(live_server: LiveServer, tmp_path: Path, png_b64: str) -> None:
    node = shutil.which("node")
    assert node, "node is required for the JS SDK test"
    image = Image.open(io.BytesIO(base64.b64decode(png_b64)))
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (image.width // 4, image.height // 4, image.width // 2, image.height // 2))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    (tmp_path / "img.b64").write_text(png_b64)
    (tmp_path / "mask.b64").write_text(base64.b64encode(buf.getvalue()).decode())
    files = [str(tmp_path / "img.b64"), str(tmp_path / "mask.b64")]
    out = subprocess.run(
        [node, str(JS_DIR / "inpaint_flow.js"), live_server.url, "key-b", "tiny-sd15", *files],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    progress = json.loads(out.stdout)["progress"]
    assert progress["task"]["status"] == "TASK_STATUS_SUCCEED", progress["task"]
    assert progress["task"]["task_type"] == "INPAINTING"
    (result,) = progress["images"]
    downloaded = Image.open(io.BytesIO(httpx.get(result["image_url"]).content))
    assert downloaded.size == image.size
