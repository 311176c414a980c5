"""The img2img, inpainting and txt2img pipeline, as explicit stages (diffusers style) over our own samplers and prompt
encoding. The executor runs each batch of compatible jobs in two calls:

    prepare_member, per job:  prepare_inpainting -> prepare_init_latents (img2img; encode_pixels)
                              -> encode_conditioning (again with the refiner's text encoder when it has a refiner)
    sample_batch, per batch:  build_batch_model_fn -> sample_img2img | sample_txt2img
                              [hires fix: upscale_first_pass ("Latent": upscale_latents; a model: decode, upscale,
                               encode), crop_latents -> sample_img2img with fix_steps (the second pass)]
                              -> decode_latents, per member (inpainting: inpainting.paste_back)
    refiner:                  switching_model_fn hands the model function over to the refiner's once
                              completed_ratio reaches switch_at

A batch whose shared sampler call fails is retried member by member (``sample_batch``). The VAE runs in the dtype
``VaePrecision`` (the executor's) chooses, and a half-precision NaN is redone in float32 (``_with_fp32_retry``).

Why not diffusers' Img2Img pipelines: A1111 semantics (sampler math, ``t_enc`` slicing, per-image CPU noise
streams, attention syntax, clip skip) differ from them in ways users notice (``docs/ARCHITECTURE.md``).
diffusers provides the models (UNet, VAE, text encoders) and the adapter loading.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from underpaint.engine import inpainting
from underpaint.engine.conditioning import Conditioning, TextEncoderBundle, encode_prompt
from underpaint.engine.devices import vae_dtype_for
from underpaint.engine.job import (
    GenerationJob,
    HiresFix,
    JobCancelled,
    JobError,
    MaskSpec,
    Progress,
    ProgressCallback,
)
from underpaint.engine.memory import release_frames
from underpaint.engine.samplers import DiscreteSchedule, NoiseSource, sample_img2img, sample_txt2img
from underpaint.tasks.batching import batchable
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


# Hires fix with an upscaler model: (first-pass image, width, height, should_cancel) -> the image at exactly that size
# (A1111's ``resize_image`` "just resize" with an upscaler: the model's passes, then Lanczos;
# ``engine.upscalers.upscale_to``). It raises ``JobCancelled`` between tiles once ``should_cancel()`` says so.
Upscale = Callable[[Image.Image, int, int, Callable[[], bool]], Image.Image]


@dataclass
class PipelineInputs:
    init_image: Image.Image | None  # None = txt2img
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
    mask: MaskSpec | None = None  # inpainting (``engine.inpainting``)
    hires_fix: HiresFix | None = None  # txt2img only


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
    # The VAE's dtype policy and what it learnt (``VaePrecision``): the executor's, shared by every batch it runs.
    vae_precision: VaePrecision = field(kw_only=True)
    # The hires fix's upscaler model for this batch (None: "Latent" or no hires fix).
    upscale: Upscale | None = None
    # The refiner this batch switches to (txt2img's ``refiner``), and, on a refiner's own components, the aesthetic
    # scores its size conditioning carries: (prompt, negative prompt).
    refiner: RefinerParts | None = None
    aesthetic_scores: tuple[float, float] | None = None


@dataclass
class RefinerParts:
    """The model a batch switches to once the completed ratio reaches ``switch_at`` (A1111 >= 1.7), with the
    prompts re-encoded by its own text encoder (``Member.refiner_conds``)."""

    components: Components
    switch_at: float


# A1111's defaults for the SDXL refiner's aesthetic-score conditioning (sdxl_refiner_high/low_aesthetic_score).
REFINER_AESTHETIC_SCORES = (6.0, 2.5)


def pil_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """Resize ("just resize", A1111 resize mode 0) and map to [-1, 1], shape [1, 3, H, W], in A1111's float32
    steps (``/ 255``, then ``2x - 1``: the random tiny test models amplify even a float32 rounding difference)."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    arr = 2.0 * (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0) - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


class VaePrecision:
    """The dtype each VAE runs in: the ``vae_dtype`` setting when it forces one (``forced``), else the model's dtype
    or float32 for a VAE that asks for it in fp16 (``devices.vae_dtype_for``); and, learnt while running, float32
    for good for a VAE that once produced a NaN in half precision (A1111's ``--no-half-vae`` fallback also sticks
    for the session). Owned by the executor (one per device, ``DiffusersExecutor.vae_precision``) and lent to the
    pipeline in ``Components``; VAEs are held weakly, so an evicted one is forgotten with it."""

    def __init__(self, forced: torch.dtype | None = None) -> None:
        self.forced = forced
        self._upcast: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def dtype(self, vae: Any, model_dtype: torch.dtype) -> torch.dtype:
        if vae in self._upcast:
            return torch.float32
        return vae_dtype_for(model_dtype, bool(getattr(vae.config, "force_upcast", False)), self.forced)

    def upcast(self, vae: Any) -> None:
        """``vae`` gave a NaN in half precision: float32 from now on."""
        self._upcast.add(vae)


def _with_fp32_retry(c: Components, what: str, run: Callable[[Any, torch.dtype], torch.Tensor]) -> torch.Tensor:
    """``run(vae, dtype)``; when a half-precision result holds a NaN or inf, once more in float32 (never return
    a NaN image). The VAE stays float32 afterwards (``VaePrecision.upcast``)."""
    dtype = c.vae_precision.dtype(c.vae, c.dtype)
    out = run(c.vae.to(dtype=dtype), dtype)
    if bool(torch.isfinite(out).all()):
        return out
    if dtype == torch.float32:
        raise JobError(f"the VAE {what} gave NaN in float32 (the checkpoint or VAE is broken)")
    log.warning("VAE %s in %s gave NaN/inf; retrying in float32 (the VAE stays float32 from now on)", what, dtype)
    c.vae_precision.upcast(c.vae)
    out = run(c.vae.to(dtype=torch.float32), torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise JobError(f"the VAE {what} gave NaN even in float32 (the checkpoint or VAE is broken)")
    return out


@torch.no_grad()
def encode_pixels(c: Components, pixels: torch.Tensor) -> torch.Tensor:
    """VAE-encode ``[1, 3, H, W]`` pixels in [-1, 1] to a scaled latent (float32, see ``LATENT_DTYPE``).

    A1111 samples the VAE posterior with the global (unseeded) RNG; we take its mean, which keeps results
    reproducible and differs from a sample by the posterior's tiny std.
    """
    pixels = pixels.to(c.device)

    def encode(vae: Any, dtype: torch.dtype) -> torch.Tensor:
        mean: torch.Tensor = vae.encode(pixels.to(dtype)).latent_dist.mean
        return mean.to(LATENT_DTYPE) * c.vae_scaling_factor

    return _with_fp32_retry(c, "encode", encode)


def prepare_init_latents(c: Components, image: Image.Image, width: int, height: int, batch: int) -> torch.Tensor:
    """VAE-encode the init image once and repeat it for the batch."""
    return encode_pixels(c, pil_to_tensor(image, width, height)).repeat(batch, 1, 1, 1)


def unet_in_channels(c: Components) -> int:
    """4 for ordinary checkpoints, 9 for inpainting ones (latent + mask + masked-image latent)."""
    return int(c.unet.config.in_channels)


@dataclass
class InpaintParts:
    """What inpainting adds to a member: the latent repaint mask, the 9-channel conditioning, the paste-back."""

    repaint_mask: torch.Tensor | None  # [1, 1, h, w], 1 = repaint; None: img2img with a 9-channel checkpoint
    image_cond: torch.Tensor | None  # [1, 5, h, w] for 9-channel checkpoints
    area: inpainting.PreparedArea | None
    noise_multiplier: float = 1.0


@torch.no_grad()
def prepare_inpainting(
    c: Components, inputs: PipelineInputs, latent_hw: tuple[int, int]
) -> tuple[Image.Image | None, InpaintParts | None]:
    """The init image the sampler starts from (None for txt2img) and the inpainting parts of one job (None unless it
    inpaints or the checkpoint has a 9-channel UNet). A 9-channel checkpoint without a mask gets A1111's
    conditioning for img2img and txt2img alike: an all-ones mask and the latent of a grey (all-zero) image."""
    spec = inputs.mask
    nine = unet_in_channels(c) == 9
    image = inputs.init_image
    if spec is None and not nine:
        return image, None
    area = None
    if spec is not None:
        if image is None:
            raise JobError("inpainting needs an init image")
        area = inpainting.prepare_area(image, spec, inputs.width, inputs.height)
        image = area.image
    h, w = latent_hw
    repaint = None
    if area is not None:
        repaint = torch.from_numpy(inpainting.latent_mask(area.mask, w, h))[None, None].to(c.device, LATENT_DTYPE)
    image_cond = None
    if nine:
        if image is not None:
            pixels = pil_to_tensor(image, inputs.width, inputs.height)
        else:
            pixels = torch.zeros(1, 3, inputs.height, inputs.width)
        if area is not None:
            cond_mask = torch.from_numpy(inpainting.conditioning_mask(area.mask))[None, None]
        else:
            cond_mask = torch.ones(1, 1, *pixels.shape[-2:])
        masked = encode_pixels(c, pixels * (1.0 - cond_mask))
        small = torch.nn.functional.interpolate(cond_mask, size=masked.shape[-2:]).to(c.device, LATENT_DTYPE)
        image_cond = torch.cat([small, masked], dim=1)
    multiplier = spec.initial_noise_multiplier if spec is not None else 1.0
    return image, InpaintParts(repaint, image_cond, area, multiplier)


@torch.no_grad()
def encode_conditioning(c: Components, inputs: PipelineInputs) -> tuple[Conditioning, Conditioning]:
    """Prompt and negative prompt, each in as many 77-token chunks as it needs.

    A1111's default leaves prompts of different chunk counts unpadded; ``build_batch_model_fn`` then runs the two
    halves of classifier-free guidance as separate UNet calls (``_entries``).

    SDXL with an empty negative prompt: zero embeddings, context and pooled vector (one 77-token chunk), as A1111
    does when every negative prompt of its batch is empty and as diffusers' ``force_zeros_for_empty_prompt`` does
    for an absent one. An A1111 batch is one task's images, which share their negative prompt, so the rule is per
    job: each member of a cross-task batch keeps its own unconditional embedding, and batching cannot change it.
    """
    kwargs: dict[str, Any] = {"clip_skip": inputs.clip_skip}
    if inputs.token_expansions:
        kwargs["token_expansions"] = inputs.token_expansions
    cond = encode_prompt(c.bundle, inputs.prompt, **kwargs)
    uncond = encode_prompt(c.bundle, inputs.negative_prompt, **kwargs)
    if c.is_sdxl and zero_negative(inputs.negative_prompt):
        uncond = Conditioning(
            embeds=torch.zeros_like(uncond.embeds),
            pooled=None if uncond.pooled is None else torch.zeros_like(uncond.pooled),
        )
    return cond, uncond


def zero_negative(negative_prompt: str) -> bool:
    """A1111's test for SDXL's zeroed unconditional embedding: the negative prompt is exactly empty (not blank)."""
    return negative_prompt == ""


def sdxl_time_ids(width: int, height: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # (original size, crop top-left, target size) as A1111 sends them for SDXL base: all at the output size.
    return torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)


@dataclass
class Member:
    """One job of a batch, ready to sample: its init latents (one row per image), its prompts, its callbacks.

    A batch shares the checkpoint, VAE, LoRAs, size, steps, sampler and strength (``BatchSpec``); everything here
    may differ between members. Each member keeps its own seeds (per-image CPU generators), guidance scale,
    IP-Adapter embeddings, ControlNet maps, progress and cancellation.
    """

    seeds: list[int]
    init_latent: torch.Tensor | None  # [len(seeds), C, h, w]; None = txt2img (the rows start from noise)
    cond: Conditioning
    uncond: Conditioning
    guidance_scale: float
    added_cond: dict[str, Any] = field(default_factory=dict)
    control: ControlHook | None = None
    on_progress: ProgressCallback | None = None
    should_cancel: Callable[[], bool] | None = None
    inpaint: InpaintParts | None = None
    refiner_conds: tuple[Conditioning, Conditioning] | None = None  # (cond, uncond) by the refiner's encoder


@dataclass(frozen=True)
class BatchSpec:
    """What every member of a batch shares besides the model: one sampler call walks one schedule."""

    width: int
    height: int
    steps: int
    sampler_name: SamplerName
    strength: float  # img2img only
    txt2img: bool = False
    hires_fix: HiresFix | None = None  # txt2img only


@dataclass
class _Entry:
    """One half of classifier-free guidance of one member: ``rows`` latents against one conditioning."""

    member: int
    uncond: bool
    cond: Conditioning


class _Batch:
    """Which members are still sampling, and how each one that stopped ended (cancelled or failed)."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = list(members)
        self.outcome: list[BaseException | None] = [None] * len(self.members)
        offsets = [0]
        for m in self.members:
            offsets.append(offsets[-1] + len(m.seeds))
        self.rows = [slice(a, b) for a, b in itertools.pairwise(offsets)]

    def active(self, k: int) -> bool:
        return self.outcome[k] is None

    def any_active(self) -> bool:
        return any(o is None for o in self.outcome)

    def drop(self, k: int, why: BaseException) -> None:
        if self.outcome[k] is None:
            self.outcome[k] = why

    def cancel_check(self, k: int) -> Callable[[], bool]:
        """Whether member ``k`` has been asked to stop (its own ``should_cancel``; never, without one)."""
        check = self.members[k].should_cancel
        return check if check is not None else lambda: False

    def poll_cancel(self) -> None:
        for k, m in enumerate(self.members):
            if self.active(k) and m.should_cancel is not None and m.should_cancel():
                self.drop(k, JobCancelled("sampling cancelled"))
        if not self.any_active():
            raise JobCancelled("every task of the batch was cancelled")

    def progress(self, p: Progress) -> None:
        for k, m in enumerate(self.members):
            if not self.active(k) or m.on_progress is None:
                continue
            try:
                m.on_progress(p)
            except Exception as exc:  # a lost lease (JobCancelled) or a store error: this member stops alone
                self.drop(k, exc)


def _entries(members: Sequence[Member], active: Callable[[int], bool]) -> list[list[_Entry]]:
    """The UNet calls of one model evaluation: entries grouped by prompt length (tokens), in member order.

    A member whose prompt and negative prompt have the same length runs both halves in one call, one whose lengths
    differ in two (A1111's default): grouping by length across members does exactly that for each of them, and the
    UNet treats every sample independently, so a member's output does not depend on its batch mates.
    """
    groups: dict[int, list[_Entry]] = {}
    for k, m in enumerate(members):
        if not active(k):
            continue
        halves = [(True, m.uncond), (False, m.cond)] if m.guidance_scale != 1.0 else [(False, m.cond)]
        for is_uncond, part in halves:
            groups.setdefault(int(part.embeds.shape[1]), []).append(_Entry(k, is_uncond, part))
    return list(groups.values())


def _half(value: Any, entry: _Entry, rows: int) -> Any:
    """An extra UNet input (IP-Adapter embeddings, ordered [uncond, cond]) for one entry's rows."""
    if isinstance(value, list):
        return [_half(v, entry, rows) for v in value]
    halves = value.chunk(2)
    value = halves[0] if entry.uncond else halves[1]
    if value.shape[0] == rows:
        return value
    if value.shape[0] != 1:
        raise ValueError(f"extra UNet input has batch {value.shape[0]}, expected 1 or {rows}")
    return value.expand(rows, *value.shape[1:])


def _cat_extra(parts: list[Any]) -> Any:
    if isinstance(parts[0], list):
        return [_cat_extra([p[i] for p in parts]) for i in range(len(parts[0]))]
    return torch.cat(parts)


def _control_residuals(
    batch: _Batch,
    group: list[_Entry],
    x_cat: torch.Tensor,
    t_cat: torch.Tensor,
    ehs: torch.Tensor,
    added: dict[str, Any] | None,
    fraction: float,
) -> dict[str, Any]:
    """Each member's ControlNet hook runs on its own entries (its own control maps); residuals are concatenated."""
    spans: list[tuple[int, int, int]] = []  # (member, start, stop) within the group, members contiguous
    start = 0
    for e in group:
        n = len(batch.members[e.member].seeds)
        if spans and spans[-1][0] == e.member:
            spans[-1] = (e.member, spans[-1][1], start + n)
        else:
            spans.append((e.member, start, start + n))
        start += n
    results: list[dict[str, Any]] = []
    for k, a, b in spans:
        hook = batch.members[k].control
        if hook is None:
            results.append({})
            continue
        sub = None if added is None else {key: _slice_rows(v, a, b) for key, v in added.items()}
        results.append(hook(x_cat[a:b], t_cat[a:b], ehs[a:b], sub, fraction))
    template = next((r for r in results if r), None)
    if template is None:
        return {}
    if len(spans) == 1:
        return template

    def zeros_like(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.new_zeros((n, *t.shape[1:]))

    filled = []
    for (_, a, b), r in zip(spans, results, strict=True):
        if not r:  # a member without ControlNet, or whose units are outside their guidance range: no residual
            down = tuple(zeros_like(d, b - a) for d in template["down_block_additional_residuals"])
            r = {
                "down_block_additional_residuals": down,
                "mid_block_additional_residual": zeros_like(template["mid_block_additional_residual"], b - a),
            }
        filled.append(r)
    return {
        "down_block_additional_residuals": tuple(
            torch.cat(parts) for parts in zip(*(r["down_block_additional_residuals"] for r in filled), strict=True)
        ),
        "mid_block_additional_residual": torch.cat([r["mid_block_additional_residual"] for r in filled]),
    }


def _slice_rows(value: Any, a: int, b: int) -> Any:
    if isinstance(value, list):
        return [_slice_rows(v, a, b) for v in value]
    return value[a:b]


def build_batch_model_fn(
    c: Components, spec: BatchSpec, batch: _Batch, step_fraction: Callable[[], float]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """UNet with classifier-free guidance for every active member; returns eps (or v) for all rows.

    Rows of members that dropped out (cancelled, failed) are not computed: their output is zero, which the samplers
    carry along harmlessly and nobody reads. Guidance scale 1 skips a member's unconditional half, which cannot
    change its result.
    """
    time_ids = sdxl_time_ids(spec.width, spec.height, c.device, c.dtype) if c.is_sdxl else None
    if c.aesthetic_scores is not None:  # the SDXL refiner: (original size, crop top-left, aesthetic score)
        size = [float(spec.height), float(spec.width), 0.0, 0.0]
        scored = {
            uncond: torch.tensor([[*size, c.aesthetic_scores[1 if uncond else 0]]], device=c.device, dtype=c.dtype)
            for uncond in (False, True)
        }

    def run(group: list[_Entry], x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xs, ts, embeds, pooled, extras, concat, ids = [], [], [], [], [], [], []
        for e in group:
            m = batch.members[e.member]
            rows = batch.rows[e.member]
            n = len(m.seeds)
            xs.append(x_in[rows])
            if m.inpaint is not None and m.inpaint.image_cond is not None:
                concat.append(m.inpaint.image_cond.expand(n, -1, -1, -1))
            ts.append(t[rows])
            embeds.append(e.cond.embeds.to(c.device, c.dtype).expand(n, -1, -1))
            if c.is_sdxl and e.cond.pooled is not None:
                pooled.append(e.cond.pooled.to(c.device, c.dtype).expand(n, -1))
                if time_ids is not None:
                    ids.append((time_ids if c.aesthetic_scores is None else scored[e.uncond]).expand(n, -1))
            if m.added_cond:
                extras.append({k: _half(v, e, n) for k, v in m.added_cond.items()})
        x_cat = torch.cat(xs).to(c.dtype)
        t_cat = torch.cat(ts).to(c.device)
        ehs = torch.cat(embeds)
        added: dict[str, Any] | None = None
        if time_ids is not None:
            p = torch.cat(pooled)
            added = {"text_embeds": p, "time_ids": torch.cat(ids)}
        if extras:
            merged = {k: _cat_extra([x[k] for x in extras]) for k in extras[0]}
            added = {**(added or {}), **merged}
        extra: dict[str, Any] = {}
        if any(batch.members[e.member].control is not None for e in group):
            extra = _control_residuals(batch, group, x_cat, t_cat, ehs, added, step_fraction())
        unet_in = x_cat
        if concat:  # 9-channel inpainting checkpoints: [latent, mask, masked-image latent] (ControlNet saw 4)
            if len(concat) != len(group):
                raise JobError("a 9-channel inpainting checkpoint needs its mask conditioning for every image")
            unet_in = torch.cat([x_cat, torch.cat(concat).to(x_cat.dtype)], dim=1)
        out: torch.Tensor = c.unet(
            unet_in, t_cat, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False, **extra
        )[0]
        return out

    def model_fn(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch.poll_cancel()
        halves: dict[tuple[int, bool], torch.Tensor] = {}
        for group in _entries(batch.members, batch.active):
            out = run(group, x_in, t)
            start = 0
            for e in group:
                n = len(batch.members[e.member].seeds)
                # Guidance is combined in the latents' dtype (float32), not in the weights' half precision.
                halves[(e.member, e.uncond)] = out[start : start + n].to(x_in.dtype)
                start += n
        result = torch.zeros_like(x_in)
        for k, m in enumerate(batch.members):
            if not batch.active(k):
                continue
            cond = halves[(k, False)]
            if m.guidance_scale == 1.0:
                result[batch.rows[k]] = cond
            else:
                uncond = halves[(k, True)]
                result[batch.rows[k]] = uncond + m.guidance_scale * (cond - uncond)
        return result

    return model_fn


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
    """Turns sampler steps into a fraction and an ETA (sampling plus an estimate for decoding).

    A job of several passes (hires fix) gives each pass a ``share`` of the whole: ``fraction`` is the completed
    part of the current pass (what ControlNet's guidance range reads), ``overall`` that of the job."""

    def __init__(self, on_progress: ProgressCallback | None, n_images: int, share: float = 1.0) -> None:
        self.on_progress = on_progress
        self.start = time.monotonic()
        self.fraction = 0.0
        self.n_images = n_images
        self.share = share
        self.offset = 0.0

    def next_pass(self, share: float) -> None:
        self.offset += self.share
        self.share = share
        self.fraction = 0.0

    def step(self, done: int, total: int) -> None:
        self.fraction = done / max(total, 1)
        if self.on_progress is None:
            return
        overall = self.offset + self.share * self.fraction
        elapsed = time.monotonic() - self.start
        per_unit = elapsed / max(overall, 1e-9)
        # Decoding costs roughly one step per image on the tiny and the real models alike.
        remaining = per_unit * (1.0 - overall) + per_unit * self.share / max(total, 1) * self.n_images
        self.on_progress(Progress(fraction=min(overall, 0.99), eta_seconds=remaining))


def prepare_member(
    c: Components,
    inputs: PipelineInputs,
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Member:
    """Encode one job's init image (img2img), its mask when it inpaints, and its prompts (its part of a batch; see
    ``sample_batch``)."""
    latent_hw = (inputs.height // inpainting.LATENT_FACTOR, inputs.width // inpainting.LATENT_FACTOR)
    image, inpaint = prepare_inpainting(c, inputs, latent_hw)
    init_latent = (
        None if image is None else prepare_init_latents(c, image, inputs.width, inputs.height, len(inputs.seeds))
    )
    cond, uncond = encode_conditioning(c, inputs)
    refined = None if c.refiner is None else encode_conditioning(c.refiner.components, inputs)
    return Member(
        seeds=list(inputs.seeds),
        init_latent=init_latent,
        cond=cond,
        uncond=uncond,
        guidance_scale=inputs.guidance_scale,
        added_cond=inputs.added_cond,
        control=inputs.control,
        on_progress=on_progress,
        should_cancel=should_cancel,
        inpaint=inpaint,
        refiner_conds=refined,
    )


def batch_spec_of(job: GenerationJob) -> BatchSpec:
    return BatchSpec(
        job.width,
        job.height,
        job.steps,
        job.sampler,
        job.strength,
        txt2img=job.is_txt2img,
        hires_fix=job.hires_fix,
    )


Outcome = list[Image.Image] | BaseException


def sample_batch(c: Components, spec: BatchSpec, members: Sequence[Member]) -> list[Outcome]:
    """Sample several members in one sampler call; one outcome per member: its images, or why it has none.

    A member that is cancelled or whose progress callback raises drops out at the next model evaluation without
    disturbing the others. If the shared call itself fails (out of memory, say), each member still running is
    retried on its own, so one bad member never fails its mates.
    """
    if len(members) > 1 and not batchable(spec.sampler_name):
        return [sample_batch(c, spec, [m])[0] for m in members]
    batch = _Batch(members)
    failure: Exception | None = None
    try:
        latents = _sample(c, spec, batch)
    except JobCancelled as exc:
        for k in range(len(members)):
            batch.drop(k, exc)
        return [o if o is not None else exc for o in batch.outcome]
    except Exception as exc:
        failure = exc
    if failure is not None:
        # Here, out of the except block and with the failed call's frames cleared, the batch's tensors are gone
        # before a retry allocates again (engine/memory.py).
        release_frames(failure)
        still = [k for k in range(len(members)) if batch.active(k)]
        if len(still) <= 1:
            for k in still:
                batch.drop(k, failure)
            return [o if o is not None else failure for o in batch.outcome]
        log.warning(
            "batch of %d failed (%s: %s); running its tasks one by one", len(still), type(failure).__name__, failure
        )
        outcomes: list[Outcome] = [o if o is not None else failure for o in batch.outcome]
        for k in still:
            outcomes[k] = sample_batch(c, spec, [members[k]])[0]
        return outcomes
    results: list[Outcome] = []
    for k in range(len(members)):
        outcome = batch.outcome[k]
        if outcome is not None:
            results.append(outcome)
            continue
        try:
            images = decode_latents(c, latents[batch.rows[k]])
            parts = members[k].inpaint
            area = parts.area if parts is not None else None
            results.append([inpainting.paste_back(im, area) for im in images] if area is not None else images)
        except Exception as exc:
            results.append(exc)
    return results


def _sample(c: Components, spec: BatchSpec, batch: _Batch) -> torch.Tensor:
    """The sampler call(s) of a batch: img2img, or txt2img and then the hires fix's second pass when asked."""
    members = batch.members
    seeds = [s for m in members for s in m.seeds]
    hires = spec.hires_fix if spec.txt2img else None
    second = hires is not None and hires.strength > 0.0
    # The second pass runs ``steps`` steps at the hires size: weigh the passes by their pixels for progress.
    weight = (hires.width * hires.height) / (spec.width * spec.height) if hires is not None and second else 0.0
    clock = _Clock(batch.progress, len(seeds), share=1.0 / (1.0 + weight))

    def cancelled() -> bool:
        return not batch.any_active()

    def guided(pass_spec: BatchSpec, refine: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        base = build_batch_model_fn(c, pass_spec, batch, lambda: clock.fraction)
        if c.refiner is None or not refine:
            return base
        refined = _refiner_model_fn(c.refiner, pass_spec, batch, lambda: clock.fraction)
        return switching_model_fn(base, refined, c.schedule, c.refiner.switch_at)

    def img2img(
        pass_spec: BatchSpec,
        latents: torch.Tensor,
        strength: float,
        fix_steps: bool,
        repaint: torch.Tensor | None = None,
        multiplier: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        # Each pass draws from fresh generators seeded seed + i (A1111 re-creates its RNG for the hires pass).
        return sample_img2img(
            spec.sampler_name,
            guided(pass_spec, refine=fix_steps or hires is None),
            c.schedule,
            latents,
            spec.steps,
            strength,
            NoiseSource.from_seeds(seeds),
            prediction_type=c.prediction_type,
            callback=clock.step,
            should_cancel=cancelled,
            fix_steps=fix_steps,
            repaint_mask=repaint,
            initial_noise_multiplier=multiplier,
        )

    with torch.no_grad():
        if not spec.txt2img:
            init = torch.cat([_img2img_latent(m) for m in members])
            repaint, multiplier = _inpaint_rows(members, init)
            return img2img(spec, init, spec.strength, False, repaint, multiplier)
        shape = (len(seeds), latent_channels(c), spec.height // 8, spec.width // 8)
        latents = sample_txt2img(
            spec.sampler_name,
            # With a hires fix the refiner joins in the second pass only (A1111's default "second pass").
            guided(spec, refine=hires is None),
            c.schedule,
            shape,
            spec.steps,
            NoiseSource.from_seeds(seeds),
            prediction_type=c.prediction_type,
            callback=clock.step,
            should_cancel=cancelled,
        )
        if hires is None:
            return latents
        batch.poll_cancel()
        latents, cover = upscale_first_pass(c, latents, (spec.width, spec.height), hires, batch)
        if not second:  # strength 0: the upscaled first pass, not denoised again
            return latents
        clock.next_pass(1.0 - clock.share)
        _grey_conditioning_at(c, members, (hires.width, hires.height))
        # The SDXL size conditioning of the second pass is the cover size, as A1111's hires conditioning.
        return img2img(
            BatchSpec(cover[0], cover[1], spec.steps, spec.sampler_name, hires.strength), latents, hires.strength, True
        )


def upscale_first_pass(
    c: Components, latents: torch.Tensor, size: tuple[int, int], hires: HiresFix, batch: _Batch
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Hires fix between the passes: the first pass's latents at the target size, and the cover size they were
    upscaled to before the centre crop (A1111 conditions the second pass on it)."""
    cover = hires_cover_size(size[0], size[1], hires.width, hires.height)
    if hires.latent:
        latents = upscale_latents(latents, cover)
    else:
        if c.upscale is None:
            raise JobError(f"hires fix upscaler {hires.upscaler!r} was not provided to the pipeline")
        latents = _upscale_with_model(c, latents, cover, c.upscale, batch)
    return crop_latents(latents, cover, (hires.width, hires.height)), cover


def _grey_conditioning_at(c: Components, members: Sequence[Member], size: tuple[int, int]) -> None:
    """A 9-channel checkpoint's hires pass: the conditioning of a txt2img pass (all-ones mask, the latent of a grey
    image) again, at the hires size."""
    if not any(m.inpaint is not None and m.inpaint.image_cond is not None for m in members):
        return
    width, height = size
    latent = encode_pixels(c, torch.zeros(1, 3, height, width))
    cond = torch.cat([latent.new_ones(1, 1, *latent.shape[-2:]), latent], dim=1)
    for m in members:
        if m.inpaint is not None:
            m.inpaint.image_cond = cond


def completed_ratio(schedule: DiscreteSchedule, t: torch.Tensor) -> float:
    """A1111 >= 1.7's refiner clock: the training timestep nearest (in sigma) to the current noise level, as
    ``(999 - timestep) / 1000``; ``t`` is the UNet's (possibly fractional) timestep."""
    sigma = schedule.t_to_sigma(float(t.max()))
    nearest = int(torch.argmin((schedule.sigmas - sigma).abs()))
    return (schedule.num_timesteps - 1 - nearest) / schedule.num_timesteps


def switching_model_fn(
    base: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    refined: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: DiscreteSchedule,
    switch_at: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The base model until the completed ratio reaches ``switch_at`` (checked before each model evaluation),
    the refiner from then on (A1111 never switches back within a pass)."""
    switched = False

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal switched
        switched = switched or completed_ratio(schedule, t) >= switch_at
        return (refined if switched else base)(x, t)

    return fn


def _refiner_model_fn(
    refiner: RefinerParts, spec: BatchSpec, batch: _Batch, step_fraction: Callable[[], float]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The refiner's guided model over the same rows: each member with its refiner conditioning (no ControlNet or
    IP-Adapter: they belong to the base model); cancellations and failures are shared with the base's batch."""
    members = []
    for m in batch.members:
        if m.refiner_conds is None:
            raise ValueError("a batch member without refiner conditioning")
        cond, uncond = m.refiner_conds
        members.append(replace(m, cond=cond, uncond=uncond, added_cond={}, control=None))
    view = _Batch(members)
    view.outcome = batch.outcome
    return build_batch_model_fn(refiner.components, spec, view, step_fraction)


def _img2img_latent(m: Member) -> torch.Tensor:
    if m.init_latent is None:
        raise ValueError("an img2img batch member without init latents")
    return m.init_latent


def latent_channels(c: Components) -> int:
    return int(getattr(c.vae.config, "latent_channels", 4))


def hires_cover_size(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """The size A1111 upscales the first pass to before cropping: the target when the aspect matches, else the
    smallest size of the first pass's aspect that covers the target (integer arithmetic as A1111's)."""
    if width * target_height < target_width * height:  # source narrower than the target: match widths
        return target_width, target_width * height // width
    return target_height * width // height, target_height


def upscale_latents(latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Hires fix "Latent": bilinear interpolation without antialias to ``size`` (pixels) // 8."""
    width, height = size
    return torch.nn.functional.interpolate(latents, size=(height // 8, width // 8), mode="bilinear", antialias=False)


def crop_latents(latents: torch.Tensor, cover: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Centre-crop cover-size latents to the target, A1111's way: ``(cover - target) // 8`` latent pixels off,
    the smaller half first."""
    tx = (cover[0] - target[0]) // 8
    ty = (cover[1] - target[1]) // 8
    h, w = latents.shape[-2:]
    return latents[:, :, ty // 2 : h - (ty + 1) // 2, tx // 2 : w - (tx + 1) // 2]


def _upscale_with_model(
    c: Components, latents: torch.Tensor, size: tuple[int, int], upscale: Upscale, batch: _Batch
) -> torch.Tensor:
    """Hires fix with an upscaler model: decode (8 bits, as A1111), upscale to ``size``, encode again, member by
    member. The upscaler asks the member's ``should_cancel`` before every tile: a member cancelled meanwhile drops out
    within one tile (its rows stay zero and are never sampled again); when none is left, ``JobCancelled``."""
    width, height = size
    parts: list[torch.Tensor] = []
    for k, rows in enumerate(batch.rows):
        own = latents[rows]
        if batch.active(k):
            try:
                images = [upscale(im, width, height, batch.cancel_check(k)) for im in decode_latents(c, own)]
                if batch.cancel_check(k)():
                    raise JobCancelled("cancelled while upscaling")
            except JobCancelled as exc:
                batch.drop(k, exc)
            else:
                parts.extend(prepare_init_latents(c, image, width, height, 1) for image in images)
                continue
        parts.append(own.new_zeros(own.shape[0], own.shape[1], height // 8, width // 8))
    if not batch.any_active():
        raise JobCancelled("every task of the batch was cancelled")
    return torch.cat(parts)


def _inpaint_rows(
    members: Sequence[Member], init_latent: torch.Tensor
) -> tuple[torch.Tensor | None, float | torch.Tensor]:
    """The batch's latent repaint mask and initial-noise multipliers, row by row (a member that does not inpaint
    repaints everything with multiplier 1, which leaves its rows exactly as plain img2img)."""
    parts = [m.inpaint for m in members]
    if all(p is None or p.repaint_mask is None for p in parts):
        repaint = None
    else:
        h, w = init_latent.shape[-2:]
        repaint = torch.cat(
            [
                (
                    p.repaint_mask if p is not None and p.repaint_mask is not None else init_latent.new_ones(1, 1, h, w)
                ).expand(len(m.seeds), -1, -1, -1)
                for m, p in zip(members, parts, strict=True)
            ]
        )
    factors = [p.noise_multiplier if p is not None else 1.0 for p in parts]
    if all(f == 1.0 for f in factors):
        return repaint, 1.0
    rows = [f for m, f in zip(members, factors, strict=True) for _ in m.seeds]
    if len(set(rows)) == 1:
        return repaint, rows[0]
    return repaint, torch.tensor(rows, dtype=init_latent.dtype, device=init_latent.device).view(-1, 1, 1, 1)


def seeds_for(seed: int, image_num: int) -> Sequence[int]:
    """Image i uses seed + i, as A1111 does (wrapping at 2**32 like its uint32 seeds)."""
    return [(seed + i) % (2**32) for i in range(image_num)]
