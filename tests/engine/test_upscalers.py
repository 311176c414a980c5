"""Upscalers: spandrel (the outside reference) loads the demo files as the architectures they claim to be, our tiled
runs agree with spandrel's own model run on the same image and windows, and A1111's Extras size/pass rules hold."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import spandrel
import torch
from PIL import Image
from tests.support.logs import assert_load_lines

from underpaint.config import Settings
from underpaint.demo.upscalers import ANIME_6B, COMPACT, ESRNET, OLD_ESRGAN, write_demo_upscalers
from underpaint.engine import upscalers as up
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.job import GenerationJob, HiresFix, JobCancelled, JobError, Progress, UpscaleJob
from underpaint.engine.memory import OutOfMemory
from underpaint.registry import ModelRegistry
from underpaint.tasks.contract import extras_size
from underpaint.vocabulary import SamplerName


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("upscalers")
    write_demo_upscalers(models)
    return models / "upscaler"


def _reference(path: Path) -> spandrel.ImageModelDescriptor:
    """The model as spandrel itself loads it (its own file reader and detection)."""
    model = spandrel.ModelLoader().load_from_file(path)
    assert isinstance(model, spandrel.ImageModelDescriptor)
    return model.eval()


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    smooth = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(smooth, dtype=np.int64) + noise, 0, 255).astype(np.uint8))


def _spandrel_run(model: spandrel.ImageModelDescriptor, image: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        result: torch.Tensor = model(image).float()
    return result


@pytest.mark.parametrize(
    ("name", "arch", "scale"),
    [
        (ANIME_6B, "ESRGAN", 4),
        (ESRNET, "ESRGAN", 4),
        (OLD_ESRGAN, "ESRGAN", 4),
        (COMPACT, "RealESRGAN Compact", 2),
    ],
)
def test_demo_files_are_what_spandrel_detects_and_one_tile_is_spandrels_output(
    upscaler_dir: Path, name: str, arch: str, scale: int
) -> None:
    ref = _reference(upscaler_dir / name)
    assert (ref.architecture.name, ref.scale) == (arch, scale)
    ours = up.load_upscaler(upscaler_dir / name)
    assert (ours.architecture, ours.scale) == (arch, scale)
    x = up.image_to_tensor(_image(30, 22))
    expected = _spandrel_run(ref, x)
    got = up.run_model(ours, x)  # smaller than one tile
    assert got.shape == (1, 3, 22 * scale, 30 * scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert float(got.std()) > 0.05
    assert 0.05 < float(got.mean()) < 0.95


def test_file_layouts_are_the_released_ones(upscaler_dir: Path) -> None:
    anime = torch.load(upscaler_dir / ANIME_6B, weights_only=True)
    assert list(anime) == ["params_ema"]
    assert {"conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_up2.bias"} <= set(
        anime["params_ema"]
    )
    old = safetensors.torch.load_file(str(upscaler_dir / OLD_ESRGAN))
    assert {"model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight", "model.1.sub.1.weight", "model.10.bias"} <= set(old)
    compact = torch.load(upscaler_dir / COMPACT, weights_only=True)
    assert list(compact) == ["params"]
    assert compact["params"]["body.6.weight"].shape[0] == 3 * 2 * 2


def test_tiles_with_enough_context_equal_the_whole_image_run(upscaler_dir: Path) -> None:
    """The compact model's receptive field (four 3x3 convs: 4 px) is within the 8 px context, so the tiled output is
    spandrel's whole-image output; an RRDBNet's is wider, and with context covering the image it is too."""
    x = up.image_to_tensor(_image(70, 45, seed=1))
    compact = up.load_upscaler(upscaler_dir / COMPACT)
    whole = _spandrel_run(_reference(upscaler_dir / COMPACT), x)
    tiled = up.run_model(compact, x, tile=16, pad=up.TILE_PAD)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    levels = up.run_model(compact, up.image_levels(_image(70, 45, seed=1)), tile=16)  # 8-bit in, 8-bit out
    assert levels.dtype == torch.uint8
    assert int((levels.int() - (whole * 255).to(torch.uint8).int()).abs().max()) <= 1
    rrdb = up.load_upscaler(upscaler_dir / ANIME_6B)
    whole = _spandrel_run(_reference(upscaler_dir / ANIME_6B), x)
    torch.testing.assert_close(up.run_model(rrdb, x, tile=16, pad=100), whole, atol=1e-5, rtol=0)
    assert float((up.run_model(rrdb, x, tile=16, pad=2) - whole).abs().max()) > 1e-3  # tiling does matter


def test_rrdb_tiles_are_spandrel_on_each_window(upscaler_dir: Path) -> None:
    """70x45 with 32 px tiles: rows [0,22) [22,45), columns [0,23) [23,47) [47,70), each run with 8 px of context."""
    x = up.image_to_tensor(_image(70, 45, seed=2))
    ref = _reference(upscaler_dir / OLD_ESRGAN)
    expected = torch.zeros((1, 3, 45 * 4, 70 * 4))
    for y0, y1 in ((0, 22), (22, 45)):
        for x0, x1 in ((0, 23), (23, 47), (47, 70)):
            wy0, wx0 = max(0, y0 - 8), max(0, x0 - 8)
            window = _spandrel_run(ref, x[:, :, wy0 : min(45, y1 + 8), wx0 : min(70, x1 + 8)])
            oy, ox = (y0 - wy0) * 4, (x0 - wx0) * 4
            crop = window[:, :, oy : oy + (y1 - y0) * 4, ox : ox + (x1 - x0) * 4]
            expected[:, :, y0 * 4 : y1 * 4, x0 * 4 : x1 * 4] = crop
    seen: list[tuple[int, int]] = []
    got = up.run_model(
        up.load_upscaler(upscaler_dir / OLD_ESRGAN), x, tile=32, on_tile=lambda d, t: seen.append((d, t))
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert seen == [(i, 6) for i in range(1, 7)]


def _a1111_extras(image: Image.Image, ref: spandrel.ImageModelDescriptor, scale: float) -> Image.Image:
    """A1111's Extras loop written out with spandrel's model on the whole image (8 bits between passes)."""
    dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    for i in range(3):
        if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
            break
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        y = _spandrel_run(ref, x)[0].permute(1, 2, 0).numpy()
        image = Image.fromarray(np.clip(255.0 * y, 0, 255).astype(np.uint8))
    return image if image.size == dest else image.resize(dest, Image.Resampling.LANCZOS)


@pytest.mark.parametrize(
    ("scale", "size", "passes"),
    [(2.5, (136, 96), 2), (2, (112, 80), 1), (1.3, (72, 48), 1), (1.0, (56, 40), 1), (10, (560, 400), 3)],
)
def test_extras_semantics_sizes_passes_and_pixels(
    upscaler_dir: Path, scale: float, size: tuple[int, int], passes: int
) -> None:
    image = _image(56, 40, seed=3)
    model = up.load_upscaler(upscaler_dir / COMPACT)  # x2
    calls: list[int] = []
    out = up.upscale(image, model, scale, tile=24, on_pass=calls.append)
    assert out.size == size == extras_size(56, 40, scale)
    assert calls == list(range(passes))
    assert up.passes_needed(56, 40, scale, 2) == passes
    expected = np.asarray(_a1111_extras(image, _reference(upscaler_dir / COMPACT), scale), dtype=np.int16)
    assert np.abs(np.asarray(out, dtype=np.int16) - expected).max() <= 1


def test_extras_size_floors_to_multiples_of_8() -> None:
    assert extras_size(333, 517, 2.5) == (832, 1288)
    assert extras_size(512, 512, 4) == (2048, 2048)
    assert extras_size(100, 60, 1.05) == (104, 56)


def test_upscale_to_is_exact_and_uses_the_model(upscaler_dir: Path) -> None:
    image = _image(40, 40, seed=4)
    model = up.load_upscaler(upscaler_dir / ANIME_6B)
    out = up.upscale_to(image, model, 100, 68)
    assert out.size == (100, 68)
    lanczos_only = image.resize((100, 68), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(out, dtype=np.int16) - np.asarray(lanczos_only, dtype=np.int16)).mean() > 5
    expected = _a1111_extras(image, _reference(upscaler_dir / ANIME_6B), 2.5).resize(
        (100, 68), Image.Resampling.LANCZOS
    )
    assert np.abs(np.asarray(out, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert up.upscale_to(image, model, 32, 32).size == (32, 32)  # downscale: Lanczos only


def test_cancel_between_tiles(upscaler_dir: Path) -> None:
    model = up.load_upscaler(upscaler_dir / COMPACT)
    with pytest.raises(JobCancelled):
        up.upscale(_image(64, 64), model, 2, tile=16, should_cancel=lambda: True)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


@pytest.mark.parametrize(
    ("content", "filename", "message"),
    [
        (b"not a model at all" * 10, "junk.pth", "refused to load|cannot read weights"),
        (b"\x08\x00\x00\x00\x00\x00\x00\x00{broken", "junk.safetensors", "cannot read weights"),
        (None, "unknown.safetensors", "not a model architecture spandrel recognises"),
        (pickle.dumps({"params": _Evil()}, protocol=2), "evil.pth", "refused to load"),
        ("evil-zip", "evil-zip.pth", "refused to load"),
    ],
    ids=["junk-pickle", "junk-safetensors", "unknown-architecture", "code-pickle", "code-in-torch-zip"],
)
def test_unusable_files_raise_a_job_error(
    tmp_path: Path, content: bytes | str | None, filename: str, message: str
) -> None:
    path = tmp_path / filename
    if content is None:
        safetensors.torch.save_file({"encoder.weight": torch.zeros(4, 4)}, str(path))
    elif content == "evil-zip":
        torch.save({"params": {"body.0.weight": torch.zeros(1)}, "x": _Evil()}, path)
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    with pytest.raises(up.UpscalerError, match=message) as caught:
        up.load_upscaler(path)
    assert isinstance(caught.value, JobError)
    assert filename in str(caught.value)


def test_cache_reuses_and_reloads_a_replaced_file(
    upscaler_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes((upscaler_dir / COMPACT).read_bytes())
    cache = up.UpscalerCache(capacity=1)
    with caplog.at_level(logging.INFO, logger="underpaint.engine"):
        first = cache.get(path)
        assert cache.get(path) is first
        assert cache.loads == 1
        path.write_bytes((upscaler_dir / ESRNET).read_bytes())
        os.utime(path, (1, 1))
        assert cache.get(path).scale == 4
        assert cache.loads == 2
    # One INFO line per load (none for a cache hit): the file and the seconds.
    assert_load_lines(caplog, "upscaler", ["model.pth", "model.pth"])
    path.unlink()
    with pytest.raises(up.UpscalerError, match="gone"):
        cache.get(path)


def test_executor_upscale_reports_progress_and_matches_the_function(upscaler_dir: Path) -> None:
    models = upscaler_dir.parent
    executor = DiffusersExecutor(Settings(models_dir=models, device="cpu", torch_threads=1), ModelRegistry(models))
    image = _image(200, 90, seed=5)  # two passes of the x2 model for x3
    seen: list[Progress] = []
    result = executor.upscale(UpscaleJob("2x-tiny-compact.pth", image, 3.0), on_progress=seen.append)
    assert result.image.size == (600, 264)  # 270 floored to a multiple of 8
    direct = up.upscale(image, up.load_upscaler(upscaler_dir / COMPACT), 3.0)
    assert np.array_equal(np.asarray(result.image), np.asarray(direct))
    assert result.infotext == "Postprocess upscale by: 3, Postprocess upscaler: 2x-tiny-compact"
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions)
    assert len(fractions) == 2 + 3  # 200x90: 2 tiles, then 400x180: 3 tiles
    assert fractions[-1] == 1.0
    executor.upscale(UpscaleJob("2x-tiny-compact", image, 2.0))
    assert executor.upscalers.loads == 1  # cached on the executor
    with pytest.raises(JobError, match="not in the models folder"):
        executor.upscale(UpscaleJob("nope", image, 2.0))


def _oom(*_args: object, **_kwargs: object) -> None:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")


@pytest.mark.parametrize("where", ["running", "loading"])
def test_executor_upscale_out_of_memory_fails_the_job_and_the_next_one_runs(
    upscaler_dir: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Out of memory while the model runs, or while spandrel builds it (which ``load_upscaler`` turns into an
    ``UpscalerError`` naming the file, a client error), is ``OutOfMemory``, with the device cache emptied after the
    ``except`` block; nothing half-loaded stays cached, and the next job runs."""
    from underpaint.engine import executor as executor_module

    executor = _executor(upscaler_dir.parent)
    job = UpscaleJob("2x-tiny-compact", _image(40, 24, seed=3), 2.0)
    target = {"running": (up, "run_model"), "loading": (spandrel.ModelLoader, "load_from_state_dict")}[where]
    monkeypatch.setattr(*target, _oom)
    frees: list[bool] = []
    monkeypatch.setattr(executor_module, "free_device_memory", lambda: frees.append(True))
    with pytest.raises(OutOfMemory, match=r"^out of GPU memory upscaling 40x24 by 2;"):
        executor.upscale(job)
    assert frees == [True]
    assert executor.upscalers.loads == (1 if where == "running" else 0)
    monkeypatch.undo()
    assert executor.upscale(job).image.size == (80, 48)


def test_the_model_never_sees_more_than_one_window(upscaler_dir: Path) -> None:
    """Memory is bounded by one (TILE + 2 * TILE_PAD)-pixel window, whatever the image size."""
    model = up.load_upscaler(upscaler_dir / COMPACT)
    seen: list[tuple[int, ...]] = []
    handle = model.descriptor.model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    try:
        out = up.upscale(_image(500, 230, seed=6), model, 2)
    finally:
        handle.remove()
    assert out.size == (1000, 456)
    assert len(seen) == 3 * 2  # 500 = 3 columns of at most 192, 230 = 2 rows
    assert max(max(shape[2:]) for shape in seen) <= up.TILE + 2 * up.TILE_PAD


# -- cancelling while an upscaler runs: within one tile, for the upscale endpoint and for hires fix ----------------


_RUN_MODEL = up.run_model


class _TileCounter:
    """Runs every model pass in 16-pixel tiles and counts the tiles; ``cancel_after`` tiles, it asks to stop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cancel_after: int | None = None) -> None:
        self.tiles = 0
        self.cancel_after = cancel_after
        real = _RUN_MODEL

        def counted(model: up.LoadedUpscaler, image: torch.Tensor, **kwargs: object) -> torch.Tensor:
            def on_tile(done: int, total: int) -> None:
                self.tiles += 1

            kwargs.update(tile=16, on_tile=on_tile)
            return real(model, image, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(up, "run_model", counted)

    def should_cancel(self) -> bool:
        return self.cancel_after is not None and self.tiles >= self.cancel_after


def _executor(models: Path) -> DiffusersExecutor:
    settings = Settings(models_dir=models, device="cpu", torch_threads=1)
    return DiffusersExecutor(settings, ModelRegistry(models))


def test_executor_upscale_stops_within_one_tile_of_a_cancel_even_in_a_later_pass(
    upscaler_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = _executor(upscaler_dir.parent)
    job = UpscaleJob("2x-tiny-compact", _image(64, 64, seed=7), 4.0)  # x2 twice: 16 tiles, then 64
    full = _TileCounter(monkeypatch)
    assert executor.upscale(job, should_cancel=full.should_cancel).image.size == (256, 256)
    assert full.tiles == 16 + 64
    for after in (3, 20):  # in the first pass; in the second
        counter = _TileCounter(monkeypatch, cancel_after=after)
        with pytest.raises(JobCancelled):
            executor.upscale(job, should_cancel=counter.should_cancel)
        assert counter.tiles == after


def _hires_job(seed: int = 1) -> GenerationJob:
    return GenerationJob(
        checkpoint="tiny-sd15",
        init_image=None,
        prompt="a red house",
        negative_prompt="",
        width=64,
        height=64,
        image_num=1,
        steps=2,
        guidance_scale=5.0,
        sampler_name=SamplerName("Euler"),
        seed=seed,
        strength=1.0,
        hires_fix=HiresFix(128, 128, 0.5, "2x-tiny-compact"),
    )


def test_a_cancel_during_hires_fix_upscaling_ends_the_job_within_one_tile(
    tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first pass is 64x64: the x2 model runs 16 tiles of 16 px. Cancelled after 3, the job ends with
    ``JobCancelled`` (what a cancel during sampling gives) before the 4th tile and before the second pass."""
    executor = _executor(tiny_models_dir)
    full = _TileCounter(monkeypatch)
    (image,) = executor.generate(_hires_job(), should_cancel=full.should_cancel)
    assert image.image.size == (128, 128)
    assert full.tiles == 16
    counter = _TileCounter(monkeypatch, cancel_after=3)
    evaluations: list[int] = []
    entry = executor.registry.resolve("checkpoint", "tiny-sd15")
    assert entry is not None
    unet = executor.cache.get(entry).unet
    handle = unet.register_forward_pre_hook(lambda *_: evaluations.append(counter.tiles))
    try:
        with pytest.raises(JobCancelled):
            executor.generate(_hires_job(), should_cancel=counter.should_cancel)
    finally:
        handle.remove()
    assert counter.tiles == 3
    assert evaluations  # the first pass sampled
    assert max(evaluations) == 0  # and the UNet never ran after the upscaler started: no second pass


def test_a_batch_mate_cancelled_during_hires_upscaling_drops_out_alone(
    tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = _executor(tiny_models_dir)
    counter = _TileCounter(monkeypatch)

    def cancel_first() -> bool:
        return counter.tiles >= 2

    jobs = [_hires_job(1), _hires_job(2)]
    outcomes = executor.generate_batch(jobs, should_cancel=[cancel_first, None])
    assert isinstance(outcomes[0], JobCancelled)
    assert not isinstance(outcomes[1], BaseException), outcomes[1]
    assert outcomes[1][0].image.size == (128, 128)
    assert counter.tiles == 2 + 16  # the first job's upscale stopped after 2 tiles, the second ran all 16
