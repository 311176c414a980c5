"""The engine's narrow interface: a fully validated, resolved generation job in, images out.

The API validates a Novita request and stores it as a typed ``tasks.contract`` request (model names resolved
against the registry); the worker turns that into a ``GenerationJob`` or ``UpscaleJob`` (``worker.jobs``, images
decoded and checked again) and hands it to an ``Executor``. Nothing here knows about HTTP or storage; which jobs
may share a sampler call (``batch_key``) is the task store's one definition, ``tasks.batching``.

One job type serves the generation endpoints: ``init_image`` set = img2img (``strength`` is its denoising strength;
with ``mask``: inpainting), ``init_image`` None = txt2img (``strength`` unused; optional ``hires_fix`` and ``refiner``
passes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from underpaint.tasks.batching import BatchSignature, lora_set
from underpaint.tasks.contract import TaskType
from underpaint.vocabulary import (
    LATENT_UPSCALER,
    PreprocessorName,
    SamplerName,
    SchedulerName,
    sampler_with_schedule,
)


@dataclass(frozen=True)
class LoraSpec:
    name: str  # registry sd_name (file name)
    strength: float


@dataclass(frozen=True)
class EmbeddingSpec:
    name: str  # registry sd_name (file name)


@dataclass(frozen=True)
class ControlNetUnitSpec:
    model: str  # registry sd_name of the ControlNet
    image: Image.Image
    strength: float = 1.0
    preprocessor: PreprocessorName | None = None  # None = use the image as the control map
    guidance_start: float = 0.0
    guidance_end: float = 1.0


@dataclass(frozen=True)
class IPAdapterSpec:
    model: str  # registry sd_name
    image: Image.Image
    strength: float


@dataclass(frozen=True)
class MaskSpec:
    """Inpainting: the mask and how to use it (``engine.inpainting``). ``mask`` is single-channel ("L", white =
    repaint), the init image's size, as ``wire.images.mask_channel`` reduced it."""

    mask: Image.Image
    blur: int = 4
    full_res: bool = False
    full_res_padding: int = 8
    invert: bool = False
    initial_noise_multiplier: float = 1.0


@dataclass(frozen=True)
class HiresFix:
    """txt2img's second pass, as A1111 >= 1.6 runs it: upscale the first pass to ``width`` x ``height`` (cover, then
    centre-crop when the aspect differs), then img2img at that size with denoising strength ``strength`` for exactly
    ``steps`` steps over a schedule of ``int(steps / min(strength, 0.999))``, with fresh generators seeded seed + i.
    """

    width: int  # target size (>= the first pass's size)
    height: int
    strength: float  # denoising strength of the second pass, in [0, 1]
    upscaler: str = LATENT_UPSCALER  # "Latent" (bilinear latent interpolation) or a registry upscaler sd_name

    @property
    def latent(self) -> bool:
        return self.upscaler == LATENT_UPSCALER


@dataclass(frozen=True)
class Refiner:
    """SDXL refiner (A1111 >= 1.7): switch to ``checkpoint`` once the completed ratio reaches ``switch_at``, with
    the conditioning re-encoded by the refiner's own text encoder."""

    checkpoint: str  # registry sd_name of the refiner checkpoint
    switch_at: float  # in [0, 1]


@dataclass(frozen=True)
class GenerationJob:
    checkpoint: str  # registry sd_name of the checkpoint
    init_image: Image.Image | None  # RGB; None = txt2img
    prompt: str
    negative_prompt: str
    width: int
    height: int
    image_num: int
    steps: int
    guidance_scale: float
    sampler_name: SamplerName
    seed: int  # already resolved: never -1 here
    strength: float  # img2img denoising strength; unused by txt2img (pass 1.0)
    clip_skip: int = 1  # A1111 meaning: 1 = last layer
    vae: str | None = None
    loras: tuple[LoraSpec, ...] = ()
    embeddings: tuple[EmbeddingSpec, ...] = ()
    controlnets: tuple[ControlNetUnitSpec, ...] = ()
    ip_adapters: tuple[IPAdapterSpec, ...] = ()
    # Inpainting: width x height is then the processing size (``tasks.contract.inpainting_size``), the output keeps the
    # init image's size.
    mask: MaskSpec | None = None
    hires_fix: HiresFix | None = None  # txt2img only
    refiner: Refiner | None = None  # txt2img only
    # A1111 >= 1.9's "Schedule type"; None = not sent: the sampler name means what it meant in A1111 <= 1.8.
    scheduler: SchedulerName | None = None

    @property
    def is_txt2img(self) -> bool:
        return self.init_image is None

    @property
    def sampler(self) -> SamplerName:
        """What the sampler runs: the name with the schedule type folded in (``vocabulary.sampler_with_schedule``)."""
        return sampler_with_schedule(self.sampler_name, self.scheduler)


@dataclass(frozen=True)
class UpscaleJob:
    """``POST /v3/async/upscale``: one image through an upscaler model (``engine.upscalers``), no diffusion."""

    upscaler: str  # registry sd_name of the upscaler file
    image: Image.Image
    scale: float  # A1111 Extras "upscale by": (1, 4] from the API


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    # A1111 "parameters" infotext, written into the output file's metadata.
    infotext: str


@dataclass(frozen=True)
class Progress:
    """Reported by the executor during sampling. ``fraction`` in [0, 1]; ``eta_seconds`` best estimate."""

    fraction: float
    eta_seconds: float


ProgressCallback = Callable[[Progress], None]


class JobCancelled(Exception):
    """Raised by an executor when ``should_cancel`` returned True."""


class JobError(Exception):
    """A failure the user can act on (missing file, wrong base model ...). ``str(exc)`` is shown as reason."""


# What one job of a batch ends with: its images, or the exception that ended it.
JobOutcome = list[GeneratedImage] | BaseException


def _task_type(job: GenerationJob) -> TaskType:
    if job.is_txt2img:
        return TaskType.TXT_TO_IMG
    return TaskType.IMG_TO_IMG if job.mask is None else TaskType.INPAINTING


def batch_key(job: GenerationJob) -> object:
    """Jobs with equal keys share one sampler call. The signature is ``tasks.batching``'s, the one the store keys
    queued tasks with (what may differ: prompts, seeds, ``image_num``, guidance scale, the adapters' images); a job
    whose signature never batches (DPM adaptive) gets a key of its own. An inpainting job's mask and mask settings
    are per job (each batch member carries its own latent mask, conditioning, noise multiplier and paste-back)."""
    hires = job.hires_fix
    key = BatchSignature(
        task_type=_task_type(job).value,
        checkpoint=job.checkpoint,
        width=job.width,
        height=job.height,
        steps=job.steps,
        sampler=job.sampler,
        strength=None if job.is_txt2img else job.strength,
        clip_skip=job.clip_skip,
        vae=job.vae,
        loras=lora_set((x.name, x.strength) for x in job.loras),
        controlnet=tuple(
            (u.model, u.strength, u.preprocessor or "none", u.guidance_start, u.guidance_end) for u in job.controlnets
        ),
        ip_adapters=tuple((a.model, a.strength) for a in job.ip_adapters),
        hires_fix=None if hires is None else (hires.width, hires.height, hires.strength, hires.upscaler),
        refiner=None if job.refiner is None else (job.refiner.checkpoint, job.refiner.switch_at),
    ).key()
    return key if key is not None else ("alone", id(job))


class Executor(Protocol):
    def generate(
        self,
        job: GenerationJob,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> list[GeneratedImage]:
        """One job: ``generate_batch([job], ...)`` with its outcome raised when it is an exception."""
        ...

    def generate_batch(
        self,
        jobs: Sequence[GenerationJob],
        on_progress: Sequence[ProgressCallback | None] | None = None,
        should_cancel: Sequence[Callable[[], bool] | None] | None = None,
    ) -> list[JobOutcome]:
        """Several jobs, compatible ones (equal ``batch_key``) in one sampler call; one outcome per job."""
        ...

    def upscale(
        self,
        job: UpscaleJob,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> GeneratedImage:
        """One upscale job (``engine.upscalers.upscale``) on this executor's device."""
        ...
