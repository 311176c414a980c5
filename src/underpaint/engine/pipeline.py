"""The img2img pipeline, as explicit stages (diffusers style) over our own samplers and prompt encoding.

    prepare_init_latents -> encode_conditioning -> build_model_fn -> sample_img2img -> decode_latents

Why not diffusers' Img2Img pipelines: A1111 semantics (sampler math, ``t_enc`` slicing, per-image CPU noise
streams, attention syntax, clip skip) differ from them in ways users notice (``docs/ARCHITECTURE.md``).
diffusers provides the models (UNet, VAE, text encoders) and the adapter loading.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from underpaint.engine.conditioning import Conditioning, TextEncoderBundle, encode_prompt
from underpaint.engine.devices import vae_dtype_for
from underpaint.engine.job import JobCancelled, JobError, Progress, ProgressCallback
from underpaint.engine.samplers import DiscreteSchedule, NoiseSource, sample_img2img
from underpaint.vocabulary import SamplerName

log = logging.getLogger(__name__)

# The sampler's latents, noise and sigma arithmetic stay in float32 whatever the weights' dtype (A1111's k-diffusion
# path does the same: its fp16 init latent + float32 noise promotes to float32); only the UNet call runs in the
# weights' dtype, with its output cast back.
LATENT_DTYPE = torch.float32


class ControlHook(Protocol):
    """Extra UNet inputs computed per model evaluation (ControlNet residuals)."""

    def __call__(
        self,
        x_in: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, Any] | None,
        step_fraction: float,
    ) -> dict[str, Any]: ...


@dataclass
class PipelineInputs:
    init_image: Image.Image
    prompt: str
    negative_prompt: str
    width: int
    height: int
    seeds: list[int]
    steps: int
    guidance_scale: float
    sampler_name: SamplerName
    strength: float
    clip_skip: int = 1
    token_expansions: dict[str, list[str]] = field(default_factory=dict)
    # IP-Adapter: merged into the UNet's added_cond_kwargs (already ordered [uncond, cond] along the batch).
    added_cond: dict[str, Any] = field(default_factory=dict)
    control: ControlHook | None = None


@dataclass
class Components:
    """What a loaded checkpoint lends the pipeline (see ``loader.LoadedCheckpoint``)."""

    unet: Any
    vae: Any
    bundle: TextEncoderBundle
    schedule: DiscreteSchedule
    prediction_type: str
    vae_scaling_factor: float
    is_sdxl: bool
    device: torch.device
    dtype: torch.dtype
    # The ``vae_dtype`` setting when forced; None = auto (``devices.vae_dtype_for``).
    vae_dtype: torch.dtype | None = None


def pil_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """Resize ("just resize", A1111 resize mode 0) and map to [-1, 1], shape [1, 3, H, W]."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


# VAEs that produced a NaN in half precision once: they run in float32 from then on (A1111's --no-half-vae fallback
# also sticks for the session).
_UPCAST_AFTER_NAN: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def _vae_dtype(c: Components) -> torch.dtype:
    if c.vae in _UPCAST_AFTER_NAN:
        return torch.float32
    return vae_dtype_for(c.dtype, bool(getattr(c.vae.config, "force_upcast", False)), c.vae_dtype)


def _with_fp32_retry(c: Components, what: str, run: Callable[[Any, torch.dtype], torch.Tensor]) -> torch.Tensor:
    """``run(vae, dtype)``; when a half-precision result holds a NaN or inf, once more in float32 (never return
    a NaN image). The VAE stays float32 afterwards."""
    dtype = _vae_dtype(c)
    out = run(c.vae.to(dtype=dtype), dtype)
    if bool(torch.isfinite(out).all()):
        return out
    if dtype == torch.float32:
        raise JobError(f"the VAE {what} gave NaN in float32 (the checkpoint or VAE is broken)")
    log.warning("VAE %s in %s gave NaN/inf; retrying in float32 (the VAE stays float32 from now on)", what, dtype)
    _UPCAST_AFTER_NAN.add(c.vae)
    out = run(c.vae.to(dtype=torch.float32), torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise JobError(f"the VAE {what} gave NaN even in float32 (the checkpoint or VAE is broken)")
    return out


@torch.no_grad()
def prepare_init_latents(c: Components, image: Image.Image, width: int, height: int, batch: int) -> torch.Tensor:
    """VAE-encode the init image once and repeat it for the batch (float32, see ``LATENT_DTYPE``).

    A1111 samples the VAE posterior with the global (unseeded) RNG; we take its mean, which keeps results
    reproducible and differs from a sample by the posterior's tiny std.
    """
    pixels = pil_to_tensor(image, width, height).to(c.device)

    def encode(vae: Any, dtype: torch.dtype) -> torch.Tensor:
        mean: torch.Tensor = vae.encode(pixels.to(dtype)).latent_dist.mean
        return mean.to(LATENT_DTYPE) * c.vae_scaling_factor

    latent = _with_fp32_retry(c, "encode", encode)
    return latent.repeat(batch, 1, 1, 1)


@torch.no_grad()
def encode_conditioning(c: Components, inputs: PipelineInputs) -> tuple[Conditioning, Conditioning]:
    """Prompt and negative prompt, each in as many 77-token chunks as it needs.

    A1111's default leaves prompts of different chunk counts unpadded; ``build_model_fn`` then runs the two
    halves of classifier-free guidance as separate UNet calls.
    """
    kwargs: dict[str, Any] = {"clip_skip": inputs.clip_skip}
    if inputs.token_expansions:
        kwargs["token_expansions"] = inputs.token_expansions
    cond = encode_prompt(c.bundle, inputs.prompt, **kwargs)
    uncond = encode_prompt(c.bundle, inputs.negative_prompt, **kwargs)
    return cond, uncond


def sdxl_time_ids(width: int, height: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # (original size, crop top-left, target size) as A1111 sends them for SDXL base: all at the output size.
    return torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)


def _added_cond(c: Components, parts: list[Conditioning], inputs: PipelineInputs, batch: int) -> dict[str, Any] | None:
    added: dict[str, Any] | None = None
    if c.is_sdxl:
        pooled = torch.cat([p.pooled.to(c.device, c.dtype).expand(batch, -1) for p in parts if p.pooled is not None])
        time_ids = sdxl_time_ids(inputs.width, inputs.height, c.device, c.dtype).expand(pooled.shape[0], -1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
    return added


def build_model_fn(
    c: Components,
    cond: Conditioning,
    uncond: Conditioning,
    inputs: PipelineInputs,
    batch: int,
    step_fraction: Callable[[], float],
    should_cancel: Callable[[], bool] | None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """UNet with classifier-free guidance; returns eps (or v) for ``batch`` latents.

    Guidance runs [uncond, cond] as one batch when both have the same length, else as two calls (A1111's
    default). Guidance scale 1 skips the unconditional half, which cannot change the result.
    """
    use_cfg = inputs.guidance_scale != 1.0
    groups: list[list[Conditioning]]
    if not use_cfg:
        groups = [[cond]]
    elif cond.embeds.shape[1] == uncond.embeds.shape[1]:
        groups = [[uncond, cond]]
    else:
        groups = [[uncond], [cond]]
    prepared = []
    for parts in groups:
        ehs = torch.cat([p.embeds.to(c.device, c.dtype).expand(batch, -1, -1) for p in parts])
        added = _added_cond(c, parts, inputs, batch)
        if inputs.added_cond:
            # IP-Adapter embeddings come ordered [uncond, cond]; take the halves this group needs.
            extra = {k: _select_halves(v, parts, uncond, len(groups)) for k, v in inputs.added_cond.items()}
            added = {**(added or {}), **extra}
        prepared.append((len(parts), ehs, added))
    scale = inputs.guidance_scale

    def run(
        x_in: torch.Tensor, t: torch.Tensor, n: int, ehs: torch.Tensor, added: dict[str, Any] | None
    ) -> torch.Tensor:
        x_cat = torch.cat([x_in] * n).to(c.dtype)
        t_cat = torch.cat([t] * n).to(c.device)
        extra: dict[str, Any] = {}
        if inputs.control is not None:
            extra = inputs.control(x_cat, t_cat, ehs, added, step_fraction())
        out: torch.Tensor = c.unet(
            x_cat, t_cat, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False, **extra
        )[0]
        return out

    def model_fn(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if should_cancel is not None and should_cancel():
            raise JobCancelled()
        # Guidance is combined in the latents' dtype (float32), not in the weights' half precision.
        outs = [run(x_in, t, n, ehs, added).to(x_in.dtype) for n, ehs, added in prepared]
        if not use_cfg:
            return outs[0]
        out_uncond, out_cond = outs[0].chunk(2) if len(outs) == 1 else outs
        return (out_uncond + scale * (out_cond - out_uncond)).to(x_in.dtype)

    return model_fn


def _select_halves(value: Any, parts: list[Conditioning], uncond: Conditioning, n_groups: int) -> Any:
    """Pick the [uncond] or [cond] half of a CFG-batched extra input when guidance runs as two calls."""
    if n_groups == 1 and len(parts) == 2:
        return value
    if isinstance(value, list):
        return [_select_halves(v, parts, uncond, n_groups) for v in value]
    halves = value.chunk(2)
    return halves[0] if parts[0] is uncond else halves[1]


@torch.no_grad()
def decode_latents(c: Components, latents: torch.Tensor) -> list[Image.Image]:
    """One image at a time: peak memory stays that of a single decode at any batch size. A decode with a NaN is
    redone in float32 (``_with_fp32_retry``)."""
    images = []
    for latent in latents:
        scaled = latent.unsqueeze(0) / c.vae_scaling_factor

        def decode(vae: Any, dtype: torch.dtype, scaled: torch.Tensor = scaled) -> torch.Tensor:
            pixels: torch.Tensor = vae.decode(scaled.to(dtype), return_dict=False)[0]
            return pixels

        pixels = _with_fp32_retry(c, "decode", decode)
        images.append(Image.fromarray(to_uint8(pixels[0])))
    return images


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """A decoded ``[3, H, W]`` image in [-1, 1] as ``[H, W, 3]`` uint8, with A1111's semantics: in float32, map
    to [0, 1] and clamp, multiply by 255, then *truncate* (numpy's ``astype(np.uint8)``), not round. Rounding would
    brighten every pixel by half a level on average against A1111's output."""
    unit = ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    scaled: np.ndarray = 255.0 * unit.permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(scaled.astype(np.uint8))


class _Clock:
    """Turns sampler steps into a fraction and an ETA (sampling plus an estimate for decoding)."""

    def __init__(self, on_progress: ProgressCallback | None, n_images: int) -> None:
        self.on_progress = on_progress
        self.start = time.monotonic()
        self.fraction = 0.0
        self.n_images = n_images

    def step(self, done: int, total: int) -> None:
        self.fraction = done / max(total, 1)
        if self.on_progress is None:
            return
        elapsed = time.monotonic() - self.start
        per_step = elapsed / max(done, 1)
        # Decoding costs roughly one step per image on the tiny and the real models alike.
        remaining = per_step * (total - done + self.n_images)
        self.on_progress(Progress(fraction=min(self.fraction, 0.99), eta_seconds=remaining))


def generate(
    c: Components,
    inputs: PipelineInputs,
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[Image.Image]:
    """Run one img2img job for ``len(inputs.seeds)`` images in one UNet batch."""
    batch = len(inputs.seeds)
    clock = _Clock(on_progress, batch)
    init_latent = prepare_init_latents(c, inputs.init_image, inputs.width, inputs.height, batch)
    cond, uncond = encode_conditioning(c, inputs)
    noise = NoiseSource.from_seeds(inputs.seeds)
    model_fn = build_model_fn(c, cond, uncond, inputs, batch, lambda: clock.fraction, should_cancel)
    with torch.no_grad():
        latents = sample_img2img(
            inputs.sampler_name,
            model_fn,
            c.schedule,
            init_latent,
            inputs.steps,
            inputs.strength,
            noise,
            prediction_type=c.prediction_type,
            callback=clock.step,
            should_cancel=should_cancel,
        )
    return decode_latents(c, latents)


def seeds_for(seed: int, image_num: int) -> Sequence[int]:
    """Image i uses seed + i, as A1111 does (wrapping at 2**32 like its uint32 seeds)."""
    return [(seed + i) % (2**32) for i in range(image_num)]
