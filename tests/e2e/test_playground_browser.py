"""The playground in a real browser: Debian's chromium driven by Playwright, against a real ``underpaint serve``
on the tiny demo models.

The page is used as a person would: type the key, pick the model, drop/paste/choose the init image, submit,
watch the progress, look at the images and their infotext, reuse a seed and the settings, download, cancel, and
switch to text to image with hires fix.
Screenshots (desktop and phone width) go to ``tests/output/`` (a CI artifact folder, ignored by git).

The browser is ``/usr/bin/chromium`` (``scripts/bootstrap`` installs Debian's package): Playwright downloads
nothing. A missing browser fails the test.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright
from tests.support.server import LiveServer, make_png

from underpaint.engine.metadata import read_infotext
from underpaint.vocabulary import PREPROCESSOR_NAMES, SAMPLER_NAMES

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
OUTPUT = Path(__file__).resolve().parents[1] / "output"
KEY = "key-a"
CHECKPOINT = "tiny-sd15.safetensors"


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run scripts/bootstrap (apt-get install chromium)"
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


class PageWatch:
    """What the page did that it should not: script errors, console errors (CSP violations are these), failed
    requests to this server."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None)


def submitted(page: Page) -> list[dict[str, Any]]:
    """Records each submit request the page sends (headers and body)."""
    seen: list[dict[str, Any]] = []

    def on_request(request: Any) -> None:
        if request.method == "POST" and request.url.endswith(("/v3/async/img2img", "/v3/async/txt2img")):
            body = json.loads(request.post_data or "{}")
            seen.append({"headers": request.headers, "body": body, "path": request.url.rsplit("/", 1)[-1]})

    page.on("request", on_request)
    return seen


def record_job_states(page: Page) -> None:
    """Keep every status and progress value the page renders on job cards in ``window.__jobStates``."""
    page.evaluate(
        """() => {
        window.__jobStates = [];
        const seen = (el) => window.__jobStates.push({
            id: el.dataset.taskId, status: el.dataset.status || "",
            progress: Number(el.querySelector('.progress').getAttribute('aria-valuenow') || 0),
            detail: el.querySelector('.job-detail').textContent });
        new MutationObserver((records) => {
            for (const r of records) {
                const job = r.target.closest && r.target.closest('.job');
                if (job) seen(job);
            }
        }).observe(document.getElementById('jobs'), {subtree: true, attributes: true, childList: true,
                                                     characterData: true});
    }"""
    )


def put_file_by_drop(page: Page, data: bytes, name: str) -> None:
    page.evaluate(
        """([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'image/png'}));
        const zone = document.getElementById('dropzone');
        zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""",
        [base64.b64encode(data).decode(), name],
    )


def put_file_by_paste(page: Page, data: bytes) -> None:
    page.evaluate(
        """(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'clipboard.png', {type: 'image/png'}));
        document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
    }""",
        base64.b64encode(data).decode(),
    )


def fill_form(page: Page, *, prompt: str, steps: int, image_num: int, seed: int, size: int = 128) -> None:
    page.select_option("#model_name", CHECKPOINT)
    page.fill("#prompt", prompt)
    page.fill("#negative_prompt", "blurry")
    page.fill("#width", str(size))
    page.fill("#height", str(size))
    page.fill("#steps", str(steps))
    page.fill("#image_num", str(image_num))
    page.fill("#seed", str(seed))
    page.fill("#strength", "0.7")
    page.select_option("#sampler_name", "Euler")
    page.select_option("#response_image_type", "png")


def screenshot(page: Page, path: Path, width: int) -> None:
    """The whole page at ``width``: the window is made as tall as the page, so that sticky parts sit where a
    person sees them (a full-page capture of a scrolled window draws them mid-page)."""
    page.evaluate("window.scrollTo(0, 0)")
    page.set_viewport_size({"width": width, "height": 800})
    height = int(page.evaluate("document.documentElement.scrollHeight"))
    page.set_viewport_size({"width": width, "height": min(max(height, 800), 4000)})
    page.wait_for_timeout(200)
    page.screenshot(path=str(path))


def job(page: Page, task_id: str) -> Any:
    return page.locator(f'#jobs .job[data-task-id="{task_id}"]')


def api_tasks(server: LiveServer) -> list[dict[str, Any]]:
    r = httpx.get(server.url + "/v3/async/tasks?limit=100", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return list(r.json()["tasks"])


def test_playground_in_chromium(live_server: LiveServer, browser: Browser, tmp_path: Path) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    assert "/v3/async/task-cancel" in httpx.get(live_server.url + "/openapi.json").json()["paths"]
    context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    page = context.new_page()
    watch = PageWatch(page)
    submits = submitted(page)

    # / redirects to the page; the vocabularies come from the server, the models from GET /v3/model.
    page.goto(live_server.url + "/")
    assert page.url == live_server.url + "/playground"
    sampler_options = page.eval_on_selector_all("#sampler_name option", "os => os.map(o => o.value)")
    assert sampler_options == list(SAMPLER_NAMES)
    preprocessors = page.eval_on_selector_all("#cn-preprocessor option", "os => os.map(o => o.value)")
    assert preprocessors == ["none", *sorted(PREPROCESSOR_NAMES)]

    page.fill("#api-key", "not-a-key")
    page.click("#key-save")
    expect(page.locator("#key-state")).to_have_text("key not accepted")
    assert [e for e in watch.errors if "403" not in e] == []
    watch.errors.clear()  # the browser logs the 403 of the wrong key; nothing else may fail from here on
    page.fill("#api-key", KEY)
    page.click("#key-save")
    expect(page.locator("#key-state")).to_have_text("connected")
    assert page.evaluate("localStorage.getItem('underpaint.apiKey')") == KEY
    checkpoints = page.eval_on_selector_all("#model_name option", "os => os.map(o => o.value)")
    assert CHECKPOINT in checkpoints
    assert "tiny-sdxl.safetensors" in checkpoints
    page.select_option("#model_name", CHECKPOINT)
    vaes = page.eval_on_selector_all("#sd_vae option", "os => os.map(o => o.value)")
    assert vaes[0] == ""  # "Automatic"; the SD 1.5 VAEs follow
    assert len(vaes) >= 2

    # The init image three ways: paste, drop, file chooser (the last one is used).
    put_file_by_paste(page, make_png((72, 64), seed=3))
    expect(page.locator("#init-info")).to_have_text("clipboard.png · 72\u00d764")
    put_file_by_drop(page, make_png((80, 48), seed=4), "dropped.png")
    expect(page.locator("#init-info")).to_have_text("dropped.png · 80\u00d748")
    init_png = tmp_path / "init.png"
    init_png.write_bytes(make_png((96, 80), seed=5))
    page.set_input_files("#init-file", str(init_png))
    expect(page.locator("#init-info")).to_have_text("init.png · 96\u00d780")
    expect(page.locator("#init-preview")).to_be_visible()

    # Job 1: a double click makes one task; progress is shown until the images arrive.
    record_job_states(page)
    fill_form(page, prompt="a lighthouse at dusk", steps=12, image_num=2, seed=1234)
    before = len(api_tasks(live_server))
    page.dblclick("#submit")
    first = page.locator("#jobs .job").first
    expect(first).to_have_attribute("data-status", "TASK_STATUS_SUCCEED", timeout=180_000)
    task_id = str(first.get_attribute("data-task-id"))
    assert len(api_tasks(live_server)) == before + 1
    assert len(submits) == 1
    assert submits[0]["headers"].get("idempotency-key")
    assert submits[0]["headers"]["authorization"] == f"Bearer {KEY}"
    sent = submits[0]["body"]["request"]
    assert (sent["steps"], sent["image_num"], sent["seed"], sent["sampler_name"]) == (12, 2, 1234, "Euler")
    assert (sent["width"], sent["height"], sent["model_name"]) == (128, 128, CHECKPOINT)
    states = [s for s in page.evaluate("window.__jobStates") if s["id"] == task_id]
    statuses = [s["status"] for s in states]
    assert {"TASK_STATUS_QUEUED", "TASK_STATUS_PROCESSING"} & set(statuses), statuses
    assert statuses[-1] == "TASK_STATUS_SUCCEED"
    assert states[-1]["progress"] == 100
    expect(job(page, task_id).locator(".job-detail")).to_contain_text("2 images in")

    # The gallery: both images, their seeds and the infotext read from the PNG itself.
    shots = page.locator(f'#gallery .shot[data-task-id="{task_id}"]')
    expect(shots).to_have_count(2)
    seeds = [int(s) for s in shots.evaluate_all("fs => fs.map(f => f.dataset.seed)")]
    assert seeds == [1234, 1235]  # a task's images in seed order
    for i in range(2):
        shot = shots.nth(i)
        expect(shot).to_have_attribute("data-info", "png")
        img = shot.locator("img")
        expect(img).to_have_js_property("complete", True)
        assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [128, 128]
        info = shot.locator(".shot-info").text_content() or ""
        png = httpx.get(str(shot.locator(".shot-download").get_attribute("href"))).content
        assert info == read_infotext(png)
        assert f"Seed: {shot.get_attribute('data-seed')}" in info
        assert "Steps: 12" in info
        assert info.startswith("a lighthouse at dusk\nNegative prompt: blurry\n")

    # Download, reuse seed, reuse settings.
    newest = shots.first
    with page.expect_download() as download:
        newest.locator(".shot-download").click()
    saved = tmp_path / "download.png"
    download.value.save_as(saved)
    assert download.value.suggested_filename.endswith(".png")
    assert read_infotext(saved.read_bytes()) == newest.locator(".shot-info").text_content()
    page.fill("#seed", "-1")
    newest.locator(".shot-reuse-seed").click()
    assert page.input_value("#seed") == newest.get_attribute("data-seed")
    page.fill("#prompt", "something else")
    page.fill("#steps", "3")
    page.fill("#seed", "-1")
    newest.locator(".shot-reuse").click()
    assert page.input_value("#prompt") == "a lighthouse at dusk"
    assert page.input_value("#steps") == "12"
    assert page.input_value("#seed") == newest.get_attribute("data-seed")

    # The key's recent tasks and the queue/worker status.
    row = page.locator(f'#tasks tr[data-task-id="{task_id}"]')
    expect(row).to_be_visible(timeout=15_000)
    expect(row.locator(".badge")).to_have_text("done")
    expect(row.locator("td").nth(2)).to_have_text("2")
    expect(page.locator("#q-mode")).to_contain_text("embedded, 1 alive", timeout=15_000)
    expect(page.locator("#workers li")).to_contain_text("embedded (process)")
    expect(page.locator("#q-queued")).to_have_text("0")

    # Job 2: every picker (LoRA, embedding, ControlNet, IP-Adapter), offered only for the checkpoint's base model.
    page.click("#adapters > summary")
    page.click("#lora-add")
    loras = page.eval_on_selector_all("#lora-rows .row-model option", "os => os.map(o => o.value)")
    assert "tiny-detail-sd15.safetensors" in loras
    assert not [name for name in loras if "sdxl" in name]
    page.select_option("#lora-rows .row-model", "tiny-detail-sd15.safetensors")
    page.fill("#lora-rows .row-strength", "0.6")
    page.click("#embedding-add")
    page.select_option("#embedding-rows .row-model", "tiny-easynegative-sd15.safetensors")
    page.check("#cn-enabled")
    controlnets = page.eval_on_selector_all("#cn-model option", "os => os.map(o => o.value)")
    assert "control_v11p_sd15_canny.safetensors" in controlnets
    assert not [name for name in controlnets if "sdxl" in name]
    page.select_option("#cn-model", "control_v11p_sd15_canny.safetensors")
    page.select_option("#cn-preprocessor", "canny")
    page.fill("#cn-strength", "0.8")
    page.fill("#cn-start", "0.1")
    page.fill("#cn-end", "0.9")
    page.check("#ip-enabled")
    page.select_option("#ip-model", "ip-adapter_sd15.bin")
    page.fill("#ip-strength", "0.5")
    fill_form(page, prompt="a harbour", steps=4, image_num=1, seed=99)
    page.click("#submit")
    expect(page.locator("#jobs .job")).to_have_count(2)
    adapters_job = page.locator("#jobs .job").first
    expect(adapters_job).to_have_attribute("data-status", "TASK_STATUS_SUCCEED", timeout=240_000)
    adapters_id = str(adapters_job.get_attribute("data-task-id"))
    sent = submits[-1]["body"]["request"]
    init_b64 = base64.b64encode(init_png.read_bytes()).decode()
    assert sent["loras"] == [{"model_name": "tiny-detail-sd15.safetensors", "strength": 0.6}]
    assert sent["embeddings"] == [{"model_name": "tiny-easynegative-sd15.safetensors"}]
    assert sent["controlnet"] == {
        "units": [
            {
                "model_name": "control_v11p_sd15_canny.safetensors",
                "image_base64": init_b64,  # no control image chosen: the init image
                "preprocessor": "canny",
                "strength": 0.8,
                "guidance_start": 0.1,
                "guidance_end": 0.9,
            }
        ]
    }
    assert sent["ip_adapters"] == [{"model_name": "ip-adapter_sd15.bin", "image_base64": init_b64, "strength": 0.5}]
    assert submits[-1]["headers"]["idempotency-key"] != submits[0]["headers"]["idempotency-key"]
    shot = page.locator(f'#gallery .shot[data-task-id="{adapters_id}"]')
    expect(shot).to_have_count(1)
    expect(shot.locator(".shot-info")).to_contain_text("a harbour <lora:tiny-detail-sd15:0.6>")
    # "Reuse settings" brings the adapters back too.
    page.click("#lora-rows .row-remove")
    page.click("#embedding-rows .row-remove")
    page.uncheck("#cn-enabled")
    page.uncheck("#ip-enabled")
    shot.locator(".shot-reuse").click()
    assert page.input_value("#lora-rows .row-model") == "tiny-detail-sd15.safetensors"
    assert page.input_value("#lora-rows .row-strength") == "0.6"
    assert page.input_value("#embedding-rows .row-model") == "tiny-easynegative-sd15.safetensors"
    assert page.is_checked("#cn-enabled")
    assert (page.input_value("#cn-preprocessor"), page.input_value("#cn-start")) == ("canny", "0.1")
    assert page.is_checked("#ip-enabled")
    for box in ("#cn-enabled", "#ip-enabled"):
        page.uncheck(box)
    page.click("#lora-rows .row-remove")
    page.click("#embedding-rows .row-remove")

    # Job 2 runs long; job 3 waits behind it and is cancelled from the page, then job 2 too.
    fill_form(page, prompt="a long one", steps=100, image_num=4, seed=7, size=256)
    page.click("#submit")
    expect(page.locator("#jobs .job")).to_have_count(3)
    long_id = str(page.locator("#jobs .job").first.get_attribute("data-task-id"))
    fill_form(page, prompt="a queued one", steps=10, image_num=1, seed=8)
    page.click("#submit")
    expect(page.locator("#jobs .job")).to_have_count(4)
    queued_id = str(page.locator("#jobs .job").first.get_attribute("data-task-id"))
    expect(job(page, queued_id)).to_have_attribute("data-status", "TASK_STATUS_QUEUED")
    expect(job(page, queued_id).locator(".job-detail")).to_contain_text("#1 in the queue")
    job(page, queued_id).locator(".job-cancel").click()
    expect(job(page, queued_id)).to_have_attribute("data-status", "TASK_STATUS_FAILED", timeout=30_000)
    expect(job(page, queued_id).locator(".job-detail")).to_have_text("cancelled by the client")
    job(page, long_id).locator(".job-cancel").click()
    expect(job(page, long_id)).to_have_attribute("data-status", "TASK_STATUS_FAILED", timeout=60_000)
    expect(job(page, long_id).locator(".job-detail")).to_have_text("cancelled by the client")
    assert not page.locator(f'#gallery .shot[data-task-id="{long_id}"]').count()

    # Job 5: text to image with hires fix: no init image, the hires controls, the txt2img route.
    page.click('#modes .mode[data-mode="txt2img"]')
    expect(page.locator("#dropzone")).to_be_hidden()
    expect(page.locator("#strength")).to_be_hidden()
    page.check("#hires-enabled")
    upscalers = page.eval_on_selector_all("#hires-upscaler option", "os => os.map(o => o.value)")
    assert upscalers[0] == "Latent"
    assert "RealESRGAN_x4plus_anime_6B.pth" in upscalers  # the demo upscalers, from GET /v3/model
    page.fill("#hires-width", "192")
    page.fill("#hires-height", "160")
    page.fill("#hires-strength", "0.5")
    page.select_option("#hires-upscaler", "Latent")
    page.fill("#prompt", "a lighthouse, text to image")
    page.fill("#width", "128")
    page.fill("#height", "128")
    page.fill("#steps", "4")
    page.fill("#image_num", "1")
    page.fill("#seed", "21")
    page.click("#submit")
    expect(page.locator("#jobs .job")).to_have_count(5)
    text_job = page.locator("#jobs .job").first
    expect(text_job).to_have_attribute("data-status", "TASK_STATUS_SUCCEED", timeout=180_000)
    text_id = str(text_job.get_attribute("data-task-id"))
    assert submits[-1]["path"] == "txt2img"
    sent = submits[-1]["body"]["request"]
    assert "image_base64" not in sent
    assert "strength" not in sent
    assert sent["hires_fix"] == {"target_width": 192, "target_height": 160, "strength": 0.5, "upscaler": "Latent"}
    text_shot = page.locator(f'#gallery .shot[data-task-id="{text_id}"]')
    expect(text_shot).to_have_count(1)
    expect(text_shot.locator("img")).to_have_js_property("complete", True)
    assert text_shot.locator("img").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [192, 160]
    expect(text_shot.locator(".shot-info")).to_contain_text("Hires upscaler: Latent")
    # "Reuse settings" of a txt2img image brings its mode and hires fix back.
    page.uncheck("#hires-enabled")
    page.click('#modes .mode[data-mode="img2img"]')
    expect(page.locator("#hires-enabled")).to_be_hidden()
    text_shot.locator(".shot-reuse").click()
    expect(page.locator('#modes .mode[data-mode="txt2img"]')).to_have_attribute("aria-selected", "true")
    assert page.is_checked("#hires-enabled")
    assert (page.input_value("#hires-width"), page.input_value("#hires-height")) == ("192", "160")

    # Screenshots: desktop, dark theme, phone width (nothing may overflow sideways).
    page.fill("#prompt", "a lighthouse at dusk")
    screenshot(page, OUTPUT / "playground.png", width=1360)
    page.click("#theme-toggle")
    screenshot(page, OUTPUT / "playground-dark.png", width=1360)
    page.click("#theme-toggle")
    page.set_viewport_size({"width": 390, "height": 844})
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    screenshot(page, OUTPUT / "playground-phone.png", width=390)

    # The API reference renders offline from /openapi.json.
    page.set_viewport_size({"width": 1360, "height": 900})
    page.goto(live_server.url + "/docs")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("#img2img .path")).to_have_text("/v3/async/img2img")
    page.locator("#img2img > summary").click()
    expect(page.locator("#img2img .body")).to_contain_text("guidance_scale")
    expect(page.locator("#txt2img .path")).to_have_text("/v3/async/txt2img")
    page.screenshot(path=str(OUTPUT / "docs.png"), full_page=False)

    assert watch.errors == []
    context.close()


def test_playground_upscale_mode(live_server: LiveServer, browser: Browser, tmp_path: Path) -> None:
    """The Upscale tab: only the upscaler card and the image are shown, the Extras size is previewed, the page
    posts to /v3/async/upscale and the result arrives at that size."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    watch = PageWatch(page)
    posts: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: posts.append({"url": r.url, "body": json.loads(r.post_data or "{}")}) if r.method == "POST" else None,
    )
    page.goto(live_server.url + "/playground")
    page.fill("#api-key", KEY)
    page.click("#key-save")
    expect(page.locator("#key-state")).to_have_text("connected")
    expect(page.locator("#prompt")).to_be_visible()
    page.click('#modes .mode[data-mode="upscale"]')
    expect(page.locator("#prompt")).to_be_hidden()
    expect(page.locator("#up-model")).to_be_visible()
    expect(page.locator("#submit")).to_have_text("Upscale")
    upscalers = page.eval_on_selector_all("#up-model option", "os => os.map(o => o.value)")
    assert "RealESRGAN_x4plus_anime_6B.pth" in upscalers
    page.select_option("#up-model", "2x-tiny-compact.pth")
    image = tmp_path / "small.png"
    image.write_bytes(make_png((60, 44), seed=7))
    page.set_input_files("#init-file", str(image))
    page.fill("#up-scale", "2.5")
    page.dispatch_event("#up-scale", "input")
    expect(page.locator("#up-size")).to_have_text("60\u00d744 \u2192 144\u00d7104")
    page.click("#submit")
    done = page.locator("#jobs .job").first
    expect(done).to_have_attribute("data-status", "TASK_STATUS_SUCCEED", timeout=120_000)
    (post,) = [p for p in posts if "/v3/async/" in p["url"] and "task-" not in p["url"]]
    assert post["url"].endswith("/v3/async/upscale")
    assert post["body"]["request"]["scale_factor"] == 2.5
    assert post["body"]["request"]["model_name"] == "2x-tiny-compact.pth"
    shot = page.locator("#gallery .shot").first
    expect(shot.locator("img")).to_have_js_property("complete", True)
    assert shot.locator("img").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [144, 104]
    expect(shot.locator(".shot-reuse")).to_be_hidden()
    expect(shot.locator(".shot-info")).to_contain_text("Postprocess upscaler: 2x-tiny-compact")
    screenshot(page, OUTPUT / "playground-upscale.png", 1360)
    assert watch.errors == []
    page.close()
