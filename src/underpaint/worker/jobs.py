"""Typed task request → engine job (used by workers; no FastAPI here).

The request is the ``tasks.contract`` model as accepted at submit time: defaults applied, model names replaced by
the registry ``sd_name``s, the seed resolved, images kept as the client's base64 text. Images are decoded again
here with the same checks as at submit, so a worker never trusts bytes it has not validated itself.
"""

from __future__ import annotations

from PIL import Image

from underpaint.engine.job import (
    ControlNetUnitSpec,
    EmbeddingSpec,
    GenerationJob,
    HiresFix,
    IPAdapterSpec,
    JobError,
    LoraSpec,
    MaskSpec,
    Refiner,
    UpscaleJob,
)
from underpaint.tasks.contract import (
    GenerationRequest,
    Img2ImgRequest,
    InpaintingRequest,
    TaskRequest,
    Txt2ImgRequest,
    UpscaleRequest,
)
from underpaint.wire.errors import ApiError
from underpaint.wire.images import INPAINTING_LIMITS, UPSCALE_LIMITS, decode_image, decode_mask


def job_from_request(request: TaskRequest) -> GenerationJob:
    """Raises ``JobError`` (message fit for the task's ``reason``) if the request cannot run."""
    try:
        if isinstance(request, Img2ImgRequest):
            return _img2img(request)
        if isinstance(request, Txt2ImgRequest):
            return _txt2img(request)
        if isinstance(request, InpaintingRequest):
            return _inpainting(request)
    except ApiError as exc:
        raise JobError(exc.message) from None
    raise JobError(f"unknown task type {request.task_type!r}")


def upscale_job_from_request(request: UpscaleRequest) -> UpscaleJob:
    """Raises ``JobError`` if the stored image no longer passes the upscale limits."""
    try:
        image = decode_image(request.image_base64, "request.image_base64", UPSCALE_LIMITS).image
    except ApiError as exc:
        raise JobError(exc.message) from None
    return UpscaleJob(upscaler=request.model_name, image=image, scale=request.scale_factor)


def _checked_seed(request: GenerationRequest) -> int:
    if request.seed < 0:
        raise JobError(f"the seed must be resolved before building a job, got {request.seed}")
    return request.seed


def _adapters(request: GenerationRequest) -> tuple[tuple[ControlNetUnitSpec, ...], tuple[IPAdapterSpec, ...]]:
    units = request.controlnet.units if request.controlnet is not None else []
    controlnets = tuple(
        ControlNetUnitSpec(
            model=u.model_name,
            image=decode_image(u.image_base64, f"request.controlnet.units[{i}].image_base64").image,
            strength=u.strength,
            preprocessor=u.preprocessor,
            guidance_start=u.guidance_start,
            guidance_end=u.guidance_end,
        )
        for i, u in enumerate(units)
    )
    ip_adapters = tuple(
        IPAdapterSpec(
            model=a.model_name,
            image=decode_image(a.image_base64, f"request.ip_adapters[{i}].image_base64").image,
            strength=a.strength,
        )
        for i, a in enumerate(request.ip_adapters)
    )
    return controlnets, ip_adapters


def _img2img(r: Img2ImgRequest) -> GenerationJob:
    init = decode_image(r.image_base64, "request.image_base64").image
    return _job(r, init_image=init, strength=r.strength)


def _txt2img(r: Txt2ImgRequest) -> GenerationJob:
    hires, refiner = r.hires_fix, r.refiner
    if refiner is not None and refiner.model_name is None:
        raise JobError("the refiner checkpoint must be resolved before building a job")
    return _job(
        r,
        init_image=None,
        strength=1.0,  # unused by txt2img
        hires_fix=None
        if hires is None
        else HiresFix(hires.target_width, hires.target_height, hires.strength, hires.upscaler),
        refiner=None
        if refiner is None or refiner.model_name is None
        else Refiner(refiner.model_name, refiner.switch_at),
    )


def _inpainting(r: InpaintingRequest) -> GenerationJob:
    image = decode_image(r.image_base64, "request.image_base64", INPAINTING_LIMITS).image
    mask = decode_mask(r.mask_image_base64, "request.mask_image_base64", INPAINTING_LIMITS)
    if mask.size != image.size:
        raise JobError(f"the mask is {mask.width}x{mask.height} but the image {image.width}x{image.height}")
    spec = MaskSpec(
        mask=mask,
        blur=r.mask_blur,
        full_res=r.inpainting_full_res,
        full_res_padding=r.inpainting_full_res_padding,
        invert=r.inpainting_mask_invert,
        initial_noise_multiplier=r.initial_noise_multiplier,
    )
    return _job(r, init_image=image, strength=r.strength, mask=spec)


def _job(
    r: GenerationRequest,
    *,
    init_image: Image.Image | None,
    strength: float,
    hires_fix: HiresFix | None = None,
    refiner: Refiner | None = None,
    mask: MaskSpec | None = None,
) -> GenerationJob:
    seed = _checked_seed(r)
    controlnets, ip_adapters = _adapters(r)
    return GenerationJob(
        checkpoint=r.model_name,
        init_image=init_image,
        prompt=r.prompt,
        negative_prompt=r.negative_prompt,
        width=r.width,
        height=r.height,
        image_num=r.image_num,
        steps=r.steps,
        guidance_scale=r.guidance_scale,
        sampler_name=r.sampler_name,
        scheduler=r.scheduler,
        seed=seed,
        strength=strength,
        clip_skip=r.clip_skip,
        vae=r.sd_vae or None,
        loras=tuple(LoraSpec(x.model_name, x.strength) for x in r.loras),
        embeddings=tuple(EmbeddingSpec(x.model_name) for x in r.embeddings),
        controlnets=controlnets,
        ip_adapters=ip_adapters,
        hires_fix=hires_fix,
        refiner=refiner,
        mask=mask,
    )
