"""Which tasks can share one sampler call, and which model a task needs: the one definition (torch-free).

``BatchSignature`` lists everything a batch shares: the endpoint, checkpoint, size, steps, sampler, strength, clip
skip, VAE, the LoRA set and strengths, the ControlNet and IP-Adapter configuration (models, strengths,
preprocessors, guidance ranges; not their images, which stay per task), and txt2img's hires fix and refiner. Prompts, negative prompts, embeddings,
seeds, ``image_num``, ``guidance_scale`` and the output format may differ. Its ``key`` is None for a sampler in
``UNBATCHABLE_SAMPLERS``: DPM adaptive picks its step sizes from the whole batch, so its images would depend on
their batch mates.

The store keys queued tasks with ``batch_key``/``model_key`` of their typed request; the engine groups jobs with
the signature of each ``GenerationJob`` (``engine.job.batch_key``). Both go through ``BatchSignature``, and
tests/tasks/test_task_contract.py holds the two derivations to the same answer for every field.

``model_key``: the checkpoint and LoRA set a task loads; a worker prefers queued tasks whose model key is the one
it has loaded (model-aware claiming). An upscale task runs no sampler: it is never batched, and its model key is
its upscaler's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from underpaint.tasks.contract import (
    Img2ImgRequest,
    InpaintingRequest,
    TaskRequest,
    TaskType,
    Txt2ImgRequest,
    UpscaleRequest,
)
from underpaint.vocabulary import normalize_sampler_name, resolve_sampler, sampler_algorithm, sampler_with_schedule

UNBATCHABLE_SAMPLERS = frozenset({"DPM adaptive"})

Lora = tuple[str, float]
ControlNetUnit = tuple[str, float, str, float, float]  # model, strength, preprocessor, guidance start, end
Adapter = tuple[str, float]  # model, strength
Hires = tuple[int, int, float, str]  # target width, height, denoising strength, upscaler
Refiner = tuple[str, float]  # checkpoint, switch_at


def batchable(sampler_name: str) -> bool:
    """False for a sampler whose images would depend on their batch mates."""
    return (sampler_algorithm(sampler_name) or sampler_name) not in UNBATCHABLE_SAMPLERS


def lora_set(loras: Iterable[Lora]) -> tuple[Lora, ...]:
    return tuple(sorted((str(name), float(strength)) for name, strength in loras))


@dataclass(frozen=True)
class BatchSignature:
    task_type: str
    checkpoint: str
    width: int
    height: int
    steps: int
    sampler: str  # with the schedule type folded in (``vocabulary.sampler_with_schedule``)
    strength: float | None  # img2img's denoising strength; None where the endpoint has none
    clip_skip: int
    vae: str | None
    loras: tuple[Lora, ...]  # sorted (``lora_set``)
    controlnet: tuple[ControlNetUnit, ...]
    ip_adapters: tuple[Adapter, ...]
    hires_fix: Hires | None = None  # txt2img's second pass
    refiner: Refiner | None = None  # txt2img's SDXL refiner

    def key(self) -> str | None:
        """Equal keys share a sampler call; None: never batched."""
        if not batchable(self.sampler):
            return None
        fields = asdict(self)
        canonical = normalize_sampler_name(self.sampler)
        # the algorithm and the schedule it walks: "Euler a", "Euler a Uniform" and "Euler a" + Automatic are one
        fields["sampler"] = list(resolve_sampler(canonical, None)) if canonical else self.sampler
        return _digest(fields)

    def model_key(self) -> str:
        return _digest({"checkpoint": self.checkpoint, "loras": self.loras})


def _digest(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def signature(request: Img2ImgRequest | Txt2ImgRequest | InpaintingRequest) -> BatchSignature:
    """The batch signature of a typed diffusion request."""
    units = request.controlnet.units if request.controlnet is not None else []
    return BatchSignature(
        task_type=TaskType(request.task_type).value,
        checkpoint=request.model_name,
        width=request.width,
        height=request.height,
        steps=request.steps,
        sampler=sampler_with_schedule(request.sampler_name, request.scheduler),
        strength=request.strength if isinstance(request, Img2ImgRequest | InpaintingRequest) else None,
        clip_skip=request.clip_skip,
        vae=request.sd_vae or None,
        loras=lora_set((x.model_name, x.strength) for x in request.loras),
        controlnet=tuple(
            (u.model_name, u.strength, u.preprocessor or "none", u.guidance_start, u.guidance_end) for u in units
        ),
        ip_adapters=tuple((a.model_name, a.strength) for a in request.ip_adapters),
        hires_fix=_hires(request),
        refiner=_refiner(request),
    )


def _hires(request: TaskRequest) -> Hires | None:
    hires = request.hires_fix if isinstance(request, Txt2ImgRequest) else None
    if hires is None:
        return None
    return (hires.target_width, hires.target_height, hires.strength, hires.upscaler)


def _refiner(request: TaskRequest) -> Refiner | None:
    refiner = request.refiner if isinstance(request, Txt2ImgRequest) else None
    if refiner is None:
        return None
    return (refiner.model_name or "", refiner.switch_at)


def batch_key(request: TaskRequest) -> str | None:
    if isinstance(request, UpscaleRequest):
        return None
    return signature(request).key()


def model_key(request: TaskRequest) -> str:
    if isinstance(request, UpscaleRequest):
        return _digest({"upscaler": request.model_name})
    return signature(request).model_key()
