"""Stored task payload → ``GenerationJob`` (used by workers; no FastAPI here).

The payload is ``Img2ImgRequest.model_dump()`` as accepted at submit time: defaults applied, model names
replaced by the registry ``sd_name``s, images kept as the client's base64 text. Images are decoded again here
with the same checks as at submit, so a worker never trusts bytes it has not validated itself.
"""

from __future__ import annotations

from typing import Any

from underpaint.engine.job import ControlNetUnitSpec, EmbeddingSpec, GenerationJob, IPAdapterSpec, JobError, LoraSpec
from underpaint.vocabulary import SamplerName, normalize_preprocessor_name, normalize_sampler_name
from underpaint.wire.errors import ApiError
from underpaint.wire.images import decode_image


def job_from_payload(payload: dict[str, Any], seed: int) -> GenerationJob:
    """Raises ``JobError`` (message fit for the task's ``reason``) if the payload is unusable."""
    try:
        return _build(payload, seed)
    except ApiError as exc:
        raise JobError(exc.message) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise JobError(f"invalid stored task payload: {exc!r}") from None


def _sampler(name: object) -> SamplerName:
    canonical = normalize_sampler_name(name)
    if canonical is None:
        raise ValueError(f"unknown sampler {name!r}")
    return canonical


def _build(p: dict[str, Any], seed: int) -> GenerationJob:
    if seed < 0:
        raise ValueError(f"seed must be resolved before building a job, got {seed}")
    controlnet = p.get("controlnet") or {}
    units = tuple(
        ControlNetUnitSpec(
            model=u["model_name"],
            image=decode_image(u["image_base64"], f"request.controlnet.units[{i}].image_base64").image,
            strength=float(u["strength"]),
            preprocessor=normalize_preprocessor_name(u.get("preprocessor")),
            guidance_start=float(u["guidance_start"]),
            guidance_end=float(u["guidance_end"]),
        )
        for i, u in enumerate(controlnet.get("units") or ())
    )
    adapters = tuple(
        IPAdapterSpec(
            model=a["model_name"],
            image=decode_image(a["image_base64"], f"request.ip_adapters[{i}].image_base64").image,
            strength=float(a["strength"]),
        )
        for i, a in enumerate(p.get("ip_adapters") or ())
    )
    return GenerationJob(
        checkpoint=p["model_name"],
        init_image=decode_image(p["image_base64"], "request.image_base64").image,
        prompt=p["prompt"],
        negative_prompt=p.get("negative_prompt") or "",
        width=int(p["width"]),
        height=int(p["height"]),
        image_num=int(p["image_num"]),
        steps=int(p["steps"]),
        guidance_scale=float(p["guidance_scale"]),
        sampler_name=_sampler(p["sampler_name"]),
        seed=seed,
        strength=float(p["strength"]),
        clip_skip=int(p.get("clip_skip") or 1),
        vae=p.get("sd_vae") or None,
        loras=tuple(LoraSpec(x["model_name"], float(x["strength"])) for x in p.get("loras") or ()),
        embeddings=tuple(EmbeddingSpec(x["model_name"]) for x in p.get("embeddings") or ()),
        controlnets=units,
        ip_adapters=adapters,
    )
