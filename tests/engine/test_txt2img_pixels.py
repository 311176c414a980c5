"""txt2img through the executor agrees with an independent A1111 (>= 1.6) reference within one level, unbiased.

The reference (``tests.support.txt2img_reference``) runs a separately loaded copy of the tiny SD 1.5 checkpoint
through diffusers' prompt encoding and UNet, k-diffusion's samplers with A1111's txt2img arguments (or diffusers'
DDIM/PNDM/UniPC schedulers over A1111's timestep list), diffusers' VAE and A1111's 8-bit conversion. Where the
semantics coincide, diffusers' own StableDiffusionPipeline is the reference, with the initial latents passed in.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image
from tests.support.adapter_pipes import load
from tests.support.txt2img_reference import (
    LDM_BETAS,
    Request,
    a1111_uint8,
    assert_close_unbiased,
    decode,
    guided_model,
    pipeline_of,
    reference_images,
)

from underpaint.config import Settings
from underpaint.engine import pipeline
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.job import GenerationJob, HiresFix, LoraSpec, batch_key
from underpaint.engine.samplers import NoiseSource
from underpaint.registry import ModelRegistry
from underpaint.vocabulary import SAMPLER_NAMES, SamplerName


@pytest.fixture(scope="module")
def executor(tiny_models_dir: Path) -> DiffusersExecutor:
    settings = Settings(models_dir=tiny_models_dir, device="cpu", torch_threads=1)
    return DiffusersExecutor(settings, ModelRegistry(tiny_models_dir))


@pytest.fixture(scope="module")
def pipe(tiny_models_dir: Path) -> Any:
    return pipeline_of(load(tiny_models_dir, "tiny-sd15"))


def job_for(req: Request, **extra: Any) -> GenerationJob:
    return GenerationJob(
        checkpoint="tiny-sd15",
        init_image=None,
        prompt=req.prompt,
        negative_prompt=req.negative,
        width=req.width,
        height=req.height,
        image_num=len(req.seeds),
        steps=req.steps,
        guidance_scale=req.cfg,
        sampler_name=SamplerName(req.sampler),
        seed=req.seeds[0],
        strength=1.0,
        clip_skip=req.clip_skip,
        **extra,
    )


def ours(executor: DiffusersExecutor, req: Request, **extra: Any) -> list[np.ndarray]:
    return [np.asarray(g.image) for g in executor.generate(job_for(req, **extra))]


# UniPC: 26 steps make A1111's 27-step continuous grid fall on whole timesteps (diffusers' timesteps are integers).
# DPM adaptive is compared with k-diffusion at the sampler level (test_txt2img_samplers.py: same algorithm to 1e-6
# on the toy model): over txt2img's whole sigma range it takes ~115 evaluations of the UNet, and its accept/reject
# decisions amplify rounding-level differences (k-diffusion keeps lambda and tolerances in float32) into a
# different step sequence (114 vs 117 evaluations measured even in float64), so no pixel reference can agree.
PIXEL_NAMES = [n for n in SAMPLER_NAMES if n != "DPM adaptive"]


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("name", PIXEL_NAMES)
def test_every_sampler_name_matches_the_reference(executor: DiffusersExecutor, pipe: Any, name: str) -> None:
    req = Request(name, seeds=[7], steps=26 if name == "UniPC" else 5)
    (a,) = ours(executor, req)
    (b,) = reference_images(pipe, req)
    assert_close_unbiased(a, b)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE Karras"])
def test_image_num_gives_seed_plus_i_images_matching_the_reference(
    executor: DiffusersExecutor, pipe: Any, name: str
) -> None:
    req = Request(name, seeds=[11, 12, 13], width=64, height=48)
    mine = ours(executor, req)
    refs = reference_images(pipe, req)
    assert len(mine) == 3
    for a, b in zip(mine, refs, strict=True):
        assert_close_unbiased(a, b)
    assert not np.array_equal(mine[0], mine[1])


@pytest.mark.parity
def test_clip_skip_matches_the_reference(executor: DiffusersExecutor, pipe: Any) -> None:
    req = Request("DPM++ 2M Karras", seeds=[3], clip_skip=2, prompt="a red cat, highly detailed", negative="blurry")
    (a,) = ours(executor, req)
    (b,) = reference_images(pipe, req)
    assert_close_unbiased(a, b)
    (plain,) = ours(executor, Request("DPM++ 2M Karras", seeds=[3], prompt=req.prompt, negative=req.negative))
    assert np.abs(plain.astype(np.int16) - a).max() > 1  # clip skip changes the image


@pytest.mark.parity
def test_euler_matches_diffusers_txt2img_pipeline_with_latents_passed_in(
    executor: DiffusersExecutor, pipe: Any
) -> None:
    """diffusers' own StableDiffusionPipeline where the semantics coincide: Euler on A1111's sigmas, and Euler a
    (linspace spacing) with each image's CPU generator continuing after its first draw, which is the initial noise.
    diffusers scales the latents by ``init_noise_sigma`` = sqrt(sigma_max^2 + 1): pass noise * sigma_max / that."""
    from tests.support.samplers import reference_sigmas

    seeds = [21, 22]
    for name in ("Euler", "Euler a"):
        req = Request(name, seeds=seeds, steps=6)
        if name == "Euler":
            sched: Any = EulerDiscreteScheduler(**LDM_BETAS, timestep_spacing="linspace")  # type: ignore[no-untyped-call]
            sigmas = reference_sigmas(name, req.steps)
            sched.set_timesteps(sigmas=sigmas[:-1].tolist())
            sigma_max = float(sigmas[0])
        else:
            sched = EulerAncestralDiscreteScheduler(**LDM_BETAS, timestep_spacing="linspace")  # type: ignore[no-untyped-call]
            sched.set_timesteps(req.steps)
            sigma_max = float(sched.sigmas[0])
        noise = NoiseSource(seeds)
        first = noise.randn_like(torch.empty(len(seeds), 4, 8, 8))
        latents = first * sigma_max / float(sched.init_noise_sigma)
        ref_pipe: Any = StableDiffusionPipeline(**{**pipe.components, "scheduler": sched})  # type: ignore[no-untyped-call]
        ref_pipe.set_progress_bar_config(disable=True)
        if name == "Euler":
            ref_pipe.scheduler.set_timesteps = lambda *a, **k: None  # keep A1111's sigmas
        out = ref_pipe(
            prompt=req.prompt,
            negative_prompt=req.negative,
            num_images_per_prompt=len(seeds),
            num_inference_steps=req.steps,
            guidance_scale=req.cfg,
            latents=latents,
            generator=noise.generators,
            output_type="latent",
            height=64,
            width=64,
        ).images
        for a, b in zip(ours(executor, req), decode(pipe, out), strict=True):
            assert_close_unbiased(a, b)


@pytest.mark.parity
def test_lora_matches_diffusers_lora_loading(
    executor: DiffusersExecutor, tiny_models_dir: Path, tmp_path: Path
) -> None:
    """Our LoRA hooks against diffusers' ``load_lora_weights`` + ``fuse_lora`` of the same kohya file."""
    loaded = load(tiny_models_dir, "tiny-sd15")
    ref_pipe = pipeline_of(loaded)
    lora = tiny_models_dir / "lora" / "tiny-detail-sd15.safetensors"
    ref_pipe.load_lora_weights(str(lora))
    ref_pipe.fuse_lora(lora_scale=0.8)
    req = Request("Euler a", seeds=[5])
    (a,) = ours(executor, req, loras=(LoraSpec("tiny-detail-sd15.safetensors", 0.8),))
    (b,) = reference_images(ref_pipe, req)
    assert_close_unbiased(a, b)
    (plain,) = ours(executor, req)
    assert np.abs(plain.astype(np.int16) - a).max() > 1  # the LoRA changes the image


def _latent_hires_reference(pipe: Any, req: Request, hires: HiresFix) -> list[np.ndarray]:
    """A1111 >= 1.6's hires fix, written out: first pass; cover size (integer arithmetic), bilinear latent
    interpolation without antialias, centre crop of (cover - target) // 8 latent pixels (the smaller half first);
    then img2img with fresh generators seeded seed + i over int(steps / min(d, 0.999)) sigmas with
    t_enc = steps - 1, through k-diffusion."""
    from tests.support.samplers import reference_img2img
    from tests.support.txt2img_reference import reference_latents

    first = reference_latents(pipe, req)
    w, h, tw, th = req.width, req.height, hires.width, hires.height
    cover = (tw, tw * h // w) if w / h < tw / th else (th * w // h, th)
    up = torch.nn.functional.interpolate(first, size=(cover[1] // 8, cover[0] // 8), mode="bilinear", antialias=False)
    cx, cy = (cover[0] - tw) // 8, (cover[1] - th) // 8
    up = up[:, :, cy // 2 : up.shape[2] - (cy + 1) // 2, cx // 2 : up.shape[3] - (cx + 1) // 2]
    full = int(req.steps / min(hires.strength, 0.999))
    model = guided_model(pipe, req)
    latents, _ = reference_img2img(req.sampler, model, up, full, hires.strength, req.seeds, t_enc=req.steps - 1)
    return decode(pipe, latents)


@pytest.mark.parity
@pytest.mark.parametrize(
    ("name", "hires"),
    [("Euler a", HiresFix(96, 96, 0.6)), ("DPM++ 2M", HiresFix(128, 80, 0.45))],
)
def test_latent_hires_fix_matches_the_reference(
    executor: DiffusersExecutor, pipe: Any, name: str, hires: HiresFix
) -> None:
    req = Request(name, seeds=[9, 10], width=64, height=48)
    mine = ours(executor, req, hires_fix=hires)
    refs = _latent_hires_reference(pipe, req, hires)
    for a, b in zip(mine, refs, strict=True):
        assert a.shape == (hires.height, hires.width, 3)
        assert_close_unbiased(a, b)


def test_a1111_uint8_is_the_engine_truncation() -> None:
    from underpaint.engine.pipeline import to_uint8

    x = np.linspace(-1.2, 1.2, 3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    assert np.array_equal(to_uint8(torch.from_numpy(x)), a1111_uint8(x))


def _spandrel_resize(image: Image.Image, path: Path, width: int, height: int) -> Image.Image:
    """A1111's ``resize_image`` "just resize" with an upscaler, written out over spandrel run on the whole image:
    the Extras destination floor(side * scale / 8) * 8 for scale = max(W / w, H / h), model passes (8 bits in
    between, truncated) while the image is smaller, Lanczos to it, then Lanczos to exactly W x H."""
    from spandrel import ModelLoader

    model: Any = ModelLoader().load_from_file(str(path))
    model.eval()
    scale = max(width / image.width, height / image.height)
    dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    for _ in range(3):
        if image.width >= dest[0] and image.height >= dest[1]:
            break
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            y = model(x)[0].clamp(0, 1)
        image = Image.fromarray((y.permute(1, 2, 0).numpy() * 255.0).astype(np.uint8))
    if image.size != dest:
        image = image.resize(dest, Image.Resampling.LANCZOS)
    return image.resize((width, height), Image.Resampling.LANCZOS) if image.size != (width, height) else image


@pytest.mark.parity
def test_upscaler_model_hires_fix_matches_the_reference(
    executor: DiffusersExecutor, pipe: Any, tiny_models_dir: Path
) -> None:
    """Decode the first pass (8 bits), upscale with the model to the cover size, VAE-encode (posterior mean, our
    documented choice), crop, second pass: against the same steps written out over spandrel and diffusers."""
    from tests.support.samplers import reference_img2img
    from tests.support.txt2img_reference import reference_latents

    hires = HiresFix(128, 96, 0.5, "RealESRGAN_x4plus_anime_6B")
    req = Request("Euler a", seeds=[4], width=64, height=48)
    mine = ours(executor, req, hires_fix=hires)
    path = tiny_models_dir / "upscaler" / "RealESRGAN_x4plus_anime_6B.pth"
    (low,) = decode(pipe, reference_latents(pipe, req))
    big = _spandrel_resize(Image.fromarray(low), path, 128, 96)
    pixels = torch.from_numpy(np.asarray(big, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        init = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    full = int(req.steps / hires.strength)
    latents, _ = reference_img2img(
        req.sampler, guided_model(pipe, req), init, full, 0.5, req.seeds, t_enc=req.steps - 1
    )
    (ref,) = decode(pipe, latents)
    assert mine[0].shape == (96, 128, 3)
    assert_close_unbiased(mine[0], ref)


def test_infotext_names_the_hires_fix_and_plain_txt2img_has_no_denoising_strength(
    executor: DiffusersExecutor,
) -> None:
    req = Request("Euler a", seeds=[1])
    (plain,) = executor.generate(job_for(req))
    assert "Denoising strength" not in plain.infotext
    assert "Hires" not in plain.infotext
    (hires,) = executor.generate(job_for(req, hires_fix=HiresFix(96, 80, 0.45)))
    params = hires.infotext.splitlines()[-1]
    assert "Size: 64x64" in params  # the first pass's size, as A1111 writes it
    assert "Denoising strength: 0.45" in params
    assert "Hires resize: 96x80, Hires upscaler: Latent" in params
    assert hires.image.size == (96, 80)


@pytest.mark.parametrize("hires", [None, HiresFix(96, 80, 0.5)])
def test_batched_txt2img_jobs_equal_their_solo_runs(
    tiny_models_dir: Path, hires: HiresFix | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several txt2img jobs in one sampler call (each its own seeds, prompts, guidance, image_num) give exactly
    their solo images in float64; the hires fix's second pass is batched too."""
    settings = Settings(models_dir=tiny_models_dir, torch_threads=1)
    ex64 = DiffusersExecutor(settings, ModelRegistry(tiny_models_dir), dtype=torch.float64)
    base = job_for(Request("DPM2 a", seeds=[100]), hires_fix=hires)
    jobs = [
        base,
        replace(base, seed=7, prompt="a blue boat", image_num=2, guidance_scale=4.5),
        replace(base, seed=2**32 - 1, negative_prompt="blurry", guidance_scale=1.0),
    ]
    assert len({batch_key(j) for j in jobs}) == 1
    counted: list[int] = []
    real = pipeline._sample

    def counting(c: Any, spec: Any, batch: Any) -> torch.Tensor:
        counted.append(len(batch.members))
        out: torch.Tensor = real(c, spec, batch)
        return out

    monkeypatch.setattr(pipeline, "_sample", counting)
    batched = ex64.generate_batch(jobs)
    monkeypatch.setattr(pipeline, "_sample", real)
    assert counted == [3]
    for j, out in zip(jobs, batched, strict=True):
        assert not isinstance(out, BaseException), out
        solo = ex64.generate(j)
        assert [g.seed for g in out] == [g.seed for g in solo]
        for a, b in zip(out, solo, strict=True):
            np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))


def test_txt2img_and_img2img_jobs_never_share_a_sampler_call() -> None:
    t2i = job_for(Request("Euler a", seeds=[1]))
    i2i = replace_init(t2i)
    assert batch_key(t2i) != batch_key(i2i)
    assert batch_key(t2i) != batch_key(job_for(Request("Euler a", seeds=[1]), hires_fix=HiresFix(96, 96, 0.5)))


def replace_init(job: GenerationJob) -> GenerationJob:
    return replace(job, init_image=Image.new("RGB", (64, 64)), strength=0.5)


def test_sdxl_txt2img_with_latent_hires_fix(executor: DiffusersExecutor) -> None:
    """SDXL's size conditioning follows each pass (the hires pass at the cover size); the images come out at the
    target size."""
    job = replace(
        job_for(Request("DPM++ 2M Karras", seeds=[3])), checkpoint="tiny-sdxl", hires_fix=HiresFix(80, 96, 0.55)
    )
    out = executor.generate(job)
    assert [g.image.size for g in out] == [(80, 96)]
    assert np.asarray(out[0].image).std() > 1


def test_controlnet_follows_the_hires_pass(executor: DiffusersExecutor) -> None:
    """The control map made for the first pass is resized for the larger second pass (bilinear), so ControlNet
    applies to both passes."""
    from underpaint.engine.job import ControlNetUnitSpec

    control = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    unit = ControlNetUnitSpec(model="control_v11p_sd15_canny.safetensors", image=control)
    base = job_for(Request("Euler a", seeds=[2], steps=3), hires_fix=HiresFix(96, 96, 0.5))
    (with_cn,) = executor.generate(replace(base, controlnets=(unit,)))
    (without,) = executor.generate(base)
    assert with_cn.image.size == (96, 96)
    assert np.abs(np.asarray(with_cn.image, dtype=np.int16) - np.asarray(without.image)).max() > 1
