"""Inpainting against an independent A1111 v1.8 reference, and the paste-back's promise (unmasked pixels exact).

The reference below is written here from the published method, sharing no code with ``engine.inpainting`` or the
pipeline: OpenCV blurs the mask (x pass, then y pass), numpy finds the crop box and grows it to the processing
aspect, Pillow resizes; the tiny checkpoint's own diffusers modules (UNet, VAE, CLIP) are driven directly;
k-diffusion's ``sample_euler_ancestral`` / ``sample_dpmpp_2m`` (through ``CompVisDenoiser`` and a CFG wrapper that
blends the denoised estimate with the init latent outside the mask) or the DDIM update of Song et al. (blending the
model's input before each call) sample; the result is decoded, truncated to 8 bits and composited over the input in
float. Everything runs in float64, so the two agree to rounding: at most one level per channel (the compositing
rounds differently), and exactly wherever the overlay mask is empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from tests.support.samplers import kdiffusion
from torch import Tensor

from underpaint.config import Settings
from underpaint.engine import job as engine_job
from underpaint.engine import pipeline
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.inpainting import area_cropper, prepare_area
from underpaint.engine.job import (
    ControlNetUnitSpec,
    GenerationJob,
    HiresFix,
    IPAdapterSpec,
    JobError,
    MaskSpec,
)
from underpaint.engine.samplers import sample_img2img
from underpaint.registry import ModelRegistry
from underpaint.vocabulary import PreprocessorName, SamplerName

PROMPT, NEGATIVE, CFG, STEPS = "a red apple", "blurry", 6.0, 5


@pytest.fixture(scope="module")
def executor(tiny_models_dir: Path) -> Iterator[DiffusersExecutor]:
    """A float64 executor whose sampler runs in float64 too (it keeps latents in float32 otherwise), so that the
    random tiny models, which amplify float32 rounding by orders of magnitude, compare at rounding level."""
    settings = Settings(models_dir=tiny_models_dir, device="cpu", torch_threads=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "LATENT_DTYPE", torch.float64)
        yield DiffusersExecutor(settings, ModelRegistry(tiny_models_dir), dtype=torch.float64)


def picture(width: int, height: int) -> Image.Image:
    """A smooth picture with some texture (a random image would make every edge a cliff)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.default_rng(3)
    rgb = np.stack([128 + 90 * np.sin(xx / 9), 128 + 90 * np.cos(yy / 7), 60 + xx + yy], axis=2)
    rgb += rng.normal(0, 6, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def blob_mask(width: int, height: int, box: tuple[int, int, int, int], grey: int = 255) -> Image.Image:
    arr = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    arr[y1:y2, x1:x2] = grey
    arr[y1 + 2 : y1 + 5, x1 - 3 : x1] = 255  # a ragged edge
    return Image.fromarray(arr, "L")


# ------------------------------------------------------------------------------------------------ the reference


@dataclass
class Area:
    image: Image.Image  # processing size
    mask: np.ndarray  # uint8, processing size
    overlay: np.ndarray  # uint8, input size: 255 = repainted
    box: tuple[int, int, int, int] | None


def ref_blur(mask: np.ndarray, sigma: int) -> np.ndarray:
    if sigma == 0:
        return mask
    size = 2 * int(2.5 * sigma + 0.5) + 1
    horizontal = cv2.GaussianBlur(mask, (size, 1), sigma)
    out: np.ndarray = cv2.GaussianBlur(horizontal, (1, size), sigma)
    return out


def ref_box(mask: np.ndarray, pad: int, width: int, height: int) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    x1, x2 = max(int(cols.min()) - pad, 0), min(int(cols.max()) + 1 + pad, w)
    y1, y2 = max(int(rows.min()) - pad, 0), min(int(rows.max()) + 1 + pad, h)
    aspect = width / height
    if (x2 - x1) / (y2 - y1) > aspect:  # too wide: grow the height
        y1, y2 = grow_span(y1, y2, int((x2 - x1) / aspect - (y2 - y1)), h)
    else:
        x1, x2 = grow_span(x1, x2, int((y2 - y1) * aspect - (x2 - x1)), w)
    return x1, y1, x2, y2


def grow_span(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    lo, hi = lo - grow // 2, hi + grow - grow // 2
    if hi > limit:  # past the far edge: shift back
        lo, hi = lo - (hi - limit), limit
    if lo < 0:  # before the near edge: shift forward
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def ref_fit(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize and fill: contain, centre, and fill the empty bands with the edge stretched as A1111 asks Pillow to:
    a resize of the zero-width (or zero-height) box at the edge, which samples the pixels next to it."""
    src = img.convert("RGB")
    wide = src.width * height > src.height * width
    w, h = (width, src.height * width // src.width) if wide else (src.width * height // src.height, height)
    inner = src.resize((w, h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    top, left = height // 2 - h // 2, width // 2 - w // 2
    out.paste(inner, (left, top))
    if wide and top > 0:
        out.paste(inner.resize((width, top), box=(0, 0, width, 0)), (0, 0))
        out.paste(inner.resize((width, top), box=(0, h, width, h)), (0, top + h))
    elif not wide and left > 0:
        out.paste(inner.resize((left, height), box=(0, 0, 0, height)), (0, 0))
        out.paste(inner.resize((left, height), box=(w, 0, w, height)), (left + w, 0))
    return out


def ref_area(image: Image.Image, spec: MaskSpec, width: int, height: int) -> Area:
    arr = np.asarray(spec.mask)
    arr = 255 - arr if spec.invert else arr
    blurred = ref_blur(np.ascontiguousarray(arr), spec.blur)
    if spec.full_res:
        box = ref_box(blurred, spec.full_res_padding, width, height)
        mask = np.asarray(ref_fit(Image.fromarray(blurred).crop(box), width, height))[:, :, 0]
        return Area(ref_fit(image.crop(box), width, height), mask, blurred, box)
    mask = np.asarray(Image.fromarray(blurred).resize((width, height), Image.Resampling.LANCZOS))
    doubled = np.minimum(blurred.astype(np.int32) * 2, 255).astype(np.uint8)
    return Area(image.resize((width, height), Image.Resampling.LANCZOS), mask, doubled, None)


class Streams:
    """A1111's CPU RNG: one generator per image, seeded seed + i."""

    def __init__(self, seeds: list[int]) -> None:
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]

    def randn_like(self, x: Tensor, *_: Any, **__: Any) -> Tensor:
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in self.gens]).to(x.dtype)

    def __getattr__(self, item: str) -> Any:
        return getattr(torch, item)


def embed(loaded: Any, text: str) -> Tensor:
    tok = loaded.tokenizers[0]
    ids = [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]
    ids += [tok.eos_token_id] * (77 - len(ids))
    out: Tensor = loaded.text_encoders[0](torch.tensor([ids])).last_hidden_state
    return out


@torch.no_grad()
def reference(
    loaded: Any, image: Image.Image, spec: MaskSpec, sampler: str, strength: float, seeds: list[int]
) -> list[np.ndarray]:
    width, height = image.width // 8 * 8, image.height // 8 * 8
    area = ref_area(image, spec, width, height)
    unet, vae, scale = loaded.unet, loaded.vae, loaded.vae_scaling_factor
    unit = torch.from_numpy(np.asarray(area.image).astype(np.float32) / 255.0)  # A1111: float32 in [0, 1], then 2x - 1
    pixels = (2.0 * unit - 1.0).permute(2, 0, 1)[None].double()
    init: Tensor = vae.encode(pixels).latent_dist.mean * scale
    init = init.repeat(len(seeds), 1, 1, 1)
    h, w = init.shape[-2:]
    small = np.asarray(Image.fromarray(area.mask).resize((w, h), Image.Resampling.BICUBIC), np.float64) / 255
    repaint: Tensor = torch.from_numpy(np.round(small))[None, None]
    keep = 1 - repaint
    extra = None
    if unet.config.in_channels == 9:
        m = torch.from_numpy(np.round(area.mask.astype(np.float64) / 255))[None, None]
        masked = vae.encode(pixels * (1 - m)).latent_dist.mean * scale
        extra = torch.cat([torch.nn.functional.interpolate(m, size=(h, w), mode="nearest"), masked], 1)
    cond, uncond = embed(loaded, PROMPT), embed(loaded, NEGATIVE)

    def eps(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        x_in = x if extra is None else torch.cat([x, extra.expand(x.shape[0], -1, -1, -1)], 1)
        out: Tensor = unet(x_in, t, encoder_hidden_states=c.expand(x.shape[0], -1, -1)).sample
        return out

    streams = Streams(seeds)
    first = streams.randn_like(init) * spec.initial_noise_multiplier
    # A1111 runs on float32 alphas_cumprod (built in float64 the ldm way); its sigmas follow from them in float32.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)
    t_enc = int(min(strength, 0.999) * STEPS)
    if sampler == "DDIM":  # Song et al. 2021, eta 0, over A1111's grid; the model sees the blended latent
        grid = [min(t + 1, 999) for t in range(0, 1000, 1000 // STEPS)]
        a = float(abar[grid[t_enc]])
        x = init * a**0.5 + first * (1 - a) ** 0.5
        walk = grid[:t_enc]
        for t, t_prev in zip(reversed(walk[1:]), reversed(walk[:-1]), strict=True):
            seen = x * repaint + init * keep
            tt = torch.full((x.shape[0],), float(t), dtype=x.dtype)
            e_u, e_c = eps(seen, tt, uncond), eps(seen, tt, cond)
            e = e_u + CFG * (e_c - e_u)
            a_t, a_prev = float(abar[t]), float(abar[t_prev])
            x0 = (x - (1 - a_t) ** 0.5 * e) / a_t**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * e
    else:
        sampling, external = kdiffusion()

        class Inner:
            alphas_cumprod = abar

            def apply_model(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
                return eps(x, t, cond)

        wrap = external.CompVisDenoiser(Inner())

        def cfg_denoiser(x: Tensor, sigma: Tensor) -> Tensor:
            d_u: Tensor = wrap(x, sigma, cond=uncond)
            d_c: Tensor = wrap(x, sigma, cond=cond)
            denoised = d_u + CFG * (d_c - d_u)
            return denoised * repaint + init * keep  # A1111 blends the denoised estimate for k-diffusion

        sigmas = wrap.get_sigmas(STEPS).double()[STEPS - t_enc - 1 :]
        x = init + first * sigmas[0]
        fn = {"Euler a": sampling.sample_euler_ancestral, "DPM++ 2M": sampling.sample_dpmpp_2m}[sampler]
        saved, sampling.torch = sampling.torch, streams
        try:
            x = fn(cfg_denoiser, x, sigmas, disable=True)
        finally:
            sampling.torch = saved
    x = x * repaint + init * keep
    results = []
    original = np.asarray(image, np.float64)
    alpha = 1 - area.overlay.astype(np.float64)[:, :, None] / 255  # the input's weight
    for latent in x:
        decoded = vae.decode(latent[None] / scale).sample[0].float()
        uint8 = (255 * ((decoded + 1) / 2).clamp(0, 1)).permute(1, 2, 0).numpy().astype(np.uint8)
        out = Image.fromarray(uint8)
        canvas = np.zeros((image.height, image.width, 3))
        covered = np.zeros((image.height, image.width, 1))
        if area.box is not None:
            x1, y1, x2, y2 = area.box
            bw, bh = x2 - x1, y2 - y1
            sw, sh = (bw, height * bw // width) if bw / bh > width / height else (width * bh // height, bh)
            big = np.asarray(out.resize((sw, sh), Image.Resampling.LANCZOS), np.float64)
            top, left = (sh - (y2 - y1)) // 2, (sw - (x2 - x1)) // 2
            canvas[y1:y2, x1:x2] = big[top : top + y2 - y1, left : left + x2 - x1]
            covered[y1:y2, x1:x2] = 1
        else:
            canvas = np.asarray(out.resize(image.size, Image.Resampling.LANCZOS), np.float64)
            covered[:] = 1
        # "over": the input (alpha) over the result (opaque where it covers, transparent elsewhere)
        a_out = alpha + covered * (1 - alpha)
        rgb = (original * alpha + canvas * covered * (1 - alpha)) / np.maximum(a_out, 1e-9)
        results.append(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    return results


# ---------------------------------------------------------------------------------------------------- the tests

CASES = [
    # checkpoint, size, full_res, blur, padding, invert, noise multiplier, sampler, strength
    ("tiny-sd15", (64, 48), False, 4, 8, False, 1.0, "Euler a", 1.0),
    ("tiny-sd15", (64, 48), False, 0, 8, True, 0.5, "DPM++ 2M", 0.75),
    ("tiny-sd15", (64, 48), True, 2, 4, False, 0.7, "Euler a", 0.8),
    ("tiny-sd15", (96, 64), True, 6, 16, False, 1.0, "DDIM", 1.0),
    ("tiny-sd15", (64, 64), False, 3, 8, False, 0.5, "DDIM", 0.6),
    ("tiny-sd15-inpainting", (64, 48), False, 4, 8, False, 1.0, "Euler a", 1.0),
    ("tiny-sd15-inpainting", (64, 48), True, 3, 0, True, 1.0, "DPM++ 2M", 0.9),
    ("tiny-sd15-inpainting", (80, 56), True, 1, 24, False, 0.5, "DDIM", 1.0),
    ("tiny-sd15", (70, 51), False, 2, 8, False, 1.0, "Euler a", 1.0),  # not multiples of 8
]


@pytest.mark.parametrize(
    ("checkpoint", "size", "full_res", "blur", "padding", "invert", "noise", "sampler", "strength"), CASES
)
def test_matches_the_a1111_reference(
    executor: DiffusersExecutor,
    checkpoint: str,
    size: tuple[int, int],
    full_res: bool,
    blur: int,
    padding: int,
    invert: bool,
    noise: float,
    sampler: str,
    strength: float,
) -> None:
    width, height = size
    image = picture(width, height)
    mask = blob_mask(width, height, (width // 2, height // 3, width // 2 + 14, height // 3 + 10), grey=200)
    if invert:  # the mask sent marks what to keep; inverted, it repaints the blob again
        mask = Image.fromarray(255 - np.asarray(mask), "L")
    spec = MaskSpec(mask, blur, full_res, padding, invert, noise)
    job = GenerationJob(
        checkpoint=checkpoint,
        init_image=image,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=width // 8 * 8,
        height=height // 8 * 8,
        image_num=2,
        steps=STEPS,
        guidance_scale=CFG,
        sampler_name=SamplerName(sampler),
        seed=42,
        strength=strength,
        mask=spec,
    )
    ours = [np.asarray(g.image) for g in executor.generate(job)]
    loaded = executor.cache.get(executor._entry("checkpoint", checkpoint))
    expected = reference(loaded, image, spec, sampler, strength, [42, 43])
    area = ref_area(image, spec, width // 8 * 8, height // 8 * 8)
    for got, want in zip(ours, expected, strict=True):
        assert got.shape == (height, width, 3)
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        assert diff.max() <= 1, f"{(diff > 1).sum()} values differ by more than one level (max {diff.max()})"
        untouched = area.overlay == 0
        assert untouched.any()
        assert (~untouched).any()
        assert np.array_equal(got[untouched], np.asarray(image)[untouched])  # byte-identical outside
        assert (got[~untouched] != np.asarray(image)[~untouched]).any()  # and something was repainted


def test_nine_channel_checkpoints_run_img2img_and_txt2img_with_the_grey_conditioning(
    executor: DiffusersExecutor,
) -> None:
    """Without a mask, a 9-channel UNet gets A1111's [all-ones mask, latent of a grey image], at every size (the
    hires fix's second pass too); nothing is pasted back."""
    image = picture(64, 48)
    base = GenerationJob(
        checkpoint="tiny-sd15-inpainting",
        init_image=image,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=64,
        height=48,
        image_num=1,
        steps=3,
        guidance_scale=CFG,
        sampler_name=SamplerName("Euler"),
        seed=3,
        strength=0.5,
    )
    (img2img,) = executor.generate(base)
    assert img2img.image.size == (64, 48)
    assert "Mask blur" not in img2img.infotext
    (txt2img,) = executor.generate(
        replace(base, init_image=None, strength=1.0, hires_fix=HiresFix(width=96, height=64, strength=0.5))
    )
    assert txt2img.image.size == (96, 64)


def test_infotext_carries_the_mask_settings(executor: DiffusersExecutor) -> None:
    image = picture(64, 48)
    spec = MaskSpec(blob_mask(64, 48, (20, 10, 40, 30)), 6, True, 16, True, 0.5)
    job = GenerationJob(
        checkpoint="tiny-sd15",
        init_image=image,
        prompt=PROMPT,
        negative_prompt="",
        width=64,
        height=48,
        image_num=1,
        steps=2,
        guidance_scale=CFG,
        sampler_name=SamplerName("Euler"),
        seed=3,
        strength=0.5,
        mask=spec,
    )
    (out,) = executor.generate(job)
    for field in (
        "Mask blur: 6",
        "Inpaint area: Only masked",
        "Masked area padding: 16",
        "Mask mode: Inpaint not masked",
        "Masked content: original",
        "Noise multiplier: 0.5",
        "Denoising strength: 0.5",
    ):
        assert field in out.infotext


def test_an_empty_mask_fails_the_job_with_a_reason(executor: DiffusersExecutor) -> None:
    image = picture(64, 48)
    empty = MaskSpec(Image.new("L", (64, 48), 0))
    job = GenerationJob(
        checkpoint="tiny-sd15",
        init_image=image,
        prompt=PROMPT,
        negative_prompt="",
        width=64,
        height=48,
        image_num=1,
        steps=2,
        guidance_scale=CFG,
        sampler_name=SamplerName("Euler"),
        seed=3,
        strength=0.5,
        mask=empty,
    )
    with pytest.raises(JobError, match="mask is empty"):
        executor.generate(job)


def test_only_masked_cuts_controlnet_images_to_the_same_area(executor: DiffusersExecutor) -> None:
    """A ControlNet unit's image follows the init image into the crop (resized to the init image's size first), so
    the control map lines up with what is repainted."""
    image = picture(96, 64)
    spec = MaskSpec(blob_mask(96, 64, (60, 30, 80, 44)), 3, True, 6)
    area = prepare_area(image, spec, 96, 64)
    crop = area_cropper(image.size, spec, 96, 64)
    assert np.array_equal(np.asarray(crop(image)), np.asarray(area.image))
    half = image.resize((48, 32), Image.Resampling.LANCZOS)
    assert crop(half).size == (96, 64)
    assert area.crop is not None
    assert area.crop[0] > 0  # really a crop, not the whole picture
    with pytest.raises(JobError, match="mask is empty"):
        area_cropper(image.size, MaskSpec(Image.new("L", (96, 64), 0), full_res=True), 96, 64)


def test_inpainting_runs_with_a_controlnet_unit_and_an_ip_adapter(executor: DiffusersExecutor) -> None:
    image = picture(96, 64)
    job = GenerationJob(
        checkpoint="tiny-sd15-inpainting",
        init_image=image,
        prompt=PROMPT,
        negative_prompt="",
        width=96,
        height=64,
        image_num=1,
        steps=2,
        guidance_scale=CFG,
        sampler_name=SamplerName("Euler"),
        seed=3,
        strength=1.0,
        mask=MaskSpec(blob_mask(96, 64, (60, 30, 80, 44)), 3, True, 6),
        controlnets=(ControlNetUnitSpec("control_v11p_sd15_canny.safetensors", image, 0.8, PreprocessorName("canny")),),
        ip_adapters=(IPAdapterSpec("ip-adapter_sd15.bin", image, 0.5),),
    )
    (out,) = executor.generate(job)
    assert out.image.size == (96, 64)
    assert np.array_equal(np.asarray(out.image)[:20], np.asarray(image)[:20])


def test_inpainting_jobs_with_different_masks_batch_and_equal_their_solo_runs(executor: DiffusersExecutor) -> None:
    """Masks, mask settings and noise multipliers are per job: batch mates of one sampler call (float64 here) give
    their solo results, and the call really is shared."""
    image = picture(64, 48)

    def job(spec: MaskSpec, seed: int, image_num: int = 1) -> GenerationJob:
        return GenerationJob(
            checkpoint="tiny-sd15-inpainting",
            init_image=image,
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            width=64,
            height=48,
            image_num=image_num,
            steps=3,
            guidance_scale=CFG,
            sampler_name=SamplerName("Euler a"),
            seed=seed,
            strength=0.9,
            mask=spec,
        )

    jobs = [
        job(MaskSpec(blob_mask(64, 48, (30, 10, 50, 30)), 2, False, 8, False, 1.0), 5),
        job(MaskSpec(blob_mask(64, 48, (10, 20, 24, 40)), 4, True, 4, False, 0.5), 6, image_num=2),
        job(MaskSpec(blob_mask(64, 48, (30, 10, 50, 30)), 0, False, 8, True, 0.8), 7),
    ]
    assert len({engine_job.batch_key(j) for j in jobs}) == 1
    calls: list[int] = []
    real = sample_img2img

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(int(args[3].shape[0]))
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "sample_img2img", counting)
        batched = executor.generate_batch(jobs)
    assert calls == [4]
    for j, outcome in zip(jobs, batched, strict=True):
        assert not isinstance(outcome, BaseException), outcome
        for got, solo in zip(outcome, executor.generate(j), strict=True):
            diff = np.abs(np.asarray(got.image).astype(np.int16) - np.asarray(solo.image).astype(np.int16))
            assert diff.max() <= 1
