"""The playground's inpainting tab in chromium: paint a mask with the mouse, erase and invert it, submit to
``/v3/async/inpainting``, and get an image of the init image's size whose unpainted pixels are the init image's."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect
from tests.e2e.test_playground_browser import OUTPUT, PageWatch, browser, playwright, screenshot
from tests.support.server import LiveServer, make_png

pytestmark = pytest.mark.slow
__all__ = ["browser", "playwright"]  # the browser fixtures, shared with the playground test

KEY = "key-a"
SIZE = (100, 76)  # not a multiple of 8: the output keeps it all the same


def inpainting_submits(page: Page) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def on_request(request: Any) -> None:
        if request.method == "POST" and request.url.endswith("/v3/async/inpainting"):
            seen.append(json.loads(request.post_data or "{}"))

    page.on("request", on_request)
    return seen


def drag(page: Page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A mouse stroke between two points given as fractions of the mask canvas."""
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=8)
    page.mouse.up()


def test_playground_inpainting_mode(live_server: LiveServer, browser: Browser, tmp_path: Path) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page = browser.new_context(viewport={"width": 1360, "height": 900}).new_page()
    watch = PageWatch(page)
    submits = inpainting_submits(page)
    page.goto(live_server.url + "/playground")
    page.fill("#api-key", KEY)
    page.click("#key-save")
    expect(page.locator("#key-state")).to_have_text("connected")
    init = make_png(SIZE, seed=8)
    (tmp_path / "init.png").write_bytes(init)
    page.set_input_files("#init-file", str(tmp_path / "init.png"))

    expect(page.locator("#mask-card")).to_be_hidden()
    page.click('#modes .mode[data-mode="inpainting"]')
    expect(page.locator("#mask-card")).to_be_visible()
    expect(page.locator("#submit")).to_have_text("Inpaint")
    assert page.input_value("#strength") == "1"  # Novita's inpainting default
    expect(page.locator("#width")).to_be_hidden()  # the output keeps the image's size
    assert page.evaluate(
        "[document.getElementById('mask-canvas').width, document.getElementById('mask-canvas').height]"
    ) == list(SIZE)

    # Submitting without a mask is refused on the page; then a stroke, an erased part, invert twice.
    page.select_option("#model_name", "tiny-sd15-inpainting.safetensors")
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "4")
    page.fill("#seed", "21")
    page.select_option("#response_image_type", "png")
    page.click("#submit")
    expect(page.locator("#form-error")).to_contain_text("paint the area")
    page.fill("#brush-size", "30")
    drag(page, (0.3, 0.5), (0.7, 0.5))
    page.click("#tool-erase")
    drag(page, (0.65, 0.5), (0.7, 0.5))
    page.click("#tool-draw")
    assert watch.errors == []
    painted = (
        "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((v, i) => i % 4 == 3 && v).length"
    )
    assert page.eval_on_selector("#mask-canvas", painted) > 0
    page.click("#mask-invert")
    page.click("#mask-invert")
    page.fill("#mask_blur", "3")
    assert "blur(" in page.eval_on_selector("#mask-canvas", "c => c.style.filter")
    page.select_option("#inpainting_full_res", "1")
    expect(page.locator("#padding-label")).to_be_visible()
    page.fill("#inpainting_full_res_padding", "12")
    screenshot(page, OUTPUT / "playground-inpaint.png", 1360)

    page.click("#submit")
    card = page.locator("#jobs .job").first
    expect(card).to_have_attribute("data-status", "TASK_STATUS_SUCCEED", timeout=180_000)
    (body,) = submits
    sent = body["request"]
    assert "width" not in sent
    assert "height" not in sent
    assert (sent["mask_blur"], sent["inpainting_full_res"], sent["inpainting_full_res_padding"]) == (3, 1, 12)
    assert (sent["inpainting_mask_invert"], sent["strength"]) == (0, 1)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(sent["mask_image_base64"]))).convert("L"))
    assert mask.shape == (SIZE[1], SIZE[0])
    row = mask[SIZE[1] // 2]
    assert row[int(0.4 * SIZE[0])] == 255  # painted
    assert row[int(0.68 * SIZE[0])] == 0  # erased again
    assert mask[2, 2] == 0  # untouched

    shot = page.locator("#gallery .shot").first
    url = str(shot.locator(".shot-download").get_attribute("href"))
    out = np.asarray(Image.open(io.BytesIO(httpx.get(url).content)).convert("RGB"))
    original = np.asarray(Image.open(io.BytesIO(init)).convert("RGB"))
    assert out.shape == original.shape
    assert np.array_equal(out[:10], original[:10])  # far from the stroke: the init image's own pixels
    assert watch.errors == []
