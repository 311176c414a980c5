"""The inpainting request in the task contract: Novita's fields (flags as booleans or 0/1), what batches, what the
worker makes of it."""

from __future__ import annotations

import base64
import io
import itertools
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError
from tests.support.requests import img2img, inpainting

from underpaint.engine import job as engine_job
from underpaint.engine.job import JobError
from underpaint.tasks.batching import batch_key
from underpaint.tasks.contract import (
    InpaintingRequest,
    TaskRequest,
    TaskType,
    dump_request,
    inpainting_size,
    load_request,
)
from underpaint.worker.jobs import job_from_request


def png(size: tuple[int, int], mode: str = "RGB", color: Any = 0) -> str:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


IMAGE, MASK = png((64, 64), color=(90, 20, 200)), png((64, 64), "L", 255)


def client_request(**fields: Any) -> InpaintingRequest:
    base = {"model_name": "a.safetensors", "prompt": "a cat", "image_base64": IMAGE, "mask_image_base64": MASK}
    return InpaintingRequest.model_validate(base | fields)


def test_novita_defaults_and_flags_as_booleans_or_numbers() -> None:
    r = client_request()
    assert (r.strength, r.mask_blur, r.inpainting_full_res_padding, r.initial_noise_multiplier) == (1.0, 4, 8, 0.5)
    assert r.inpainting_full_res is False
    assert r.inpainting_mask_invert is False
    assert r.task_type == TaskType.INPAINTING
    for on, off in ((True, False), (1, 0)):
        r = client_request(inpainting_full_res=on, inpainting_mask_invert=off, strength=None, sd_vae="")
        assert r.inpainting_full_res is True
        assert r.inpainting_mask_invert is False
        assert r.strength == 1.0  # null: the default
    assert client_request(clip_skip=0).clip_skip == 1  # the Python SDK dataclass's default
    for bad in ({"inpainting_full_res": 2}, {"mask_blur": 65}, {"initial_noise_multiplier": 1.6}, {"strength": 1.5}):
        with pytest.raises(ValidationError):
            client_request(**bad)


def test_stored_and_read_back_as_the_same_model() -> None:
    r = client_request(inpainting_full_res=1, mask_blur=9).model_copy(update={"width": 64, "height": 64, "seed": 5})
    again = load_request(dump_request(r))
    assert isinstance(again, InpaintingRequest)
    assert again == r


def test_processing_size_is_the_image_rounded_down_to_eight() -> None:
    assert inpainting_size(512, 768) == (512, 768)
    assert inpainting_size(517, 771) == (512, 768)


PER_TASK: dict[str, dict[str, Any]] = {
    "mask_image_base64": {"mask_image_base64": png((64, 64), "L", 200)},
    "mask_blur": {"mask_blur": 12},
    "inpainting_full_res": {"inpainting_full_res": True},
    "inpainting_full_res_padding": {"inpainting_full_res_padding": 40},
    "inpainting_mask_invert": {"inpainting_mask_invert": True},
    "initial_noise_multiplier": {"initial_noise_multiplier": 0.9},
}


def test_every_inpainting_field_is_per_task_and_inpainting_batches_apart_from_img2img() -> None:
    own = set(InpaintingRequest.model_fields) - set(img2img().__class__.model_fields) - {"task_type"}
    assert own == set(PER_TASK)
    base = {"image_base64": IMAGE, "mask_image_base64": MASK}
    variants: dict[str, TaskRequest] = {"base": inpainting(**base)}
    variants |= {name: inpainting(**(base | c)) for name, c in PER_TASK.items()}
    variants["strength"] = inpainting(**(base | {"strength": 0.4}))
    variants["img2img"] = img2img(image_base64=IMAGE, width=64, height=64, strength=1.0)
    store = {name: batch_key(r) for name, r in variants.items()}
    engine = {name: engine_job.batch_key(job_from_request(r)) for name, r in variants.items()}
    for a, b in itertools.combinations(variants, 2):
        assert (store[a] == store[b]) == (engine[a] == engine[b]), (a, b)
    for name in PER_TASK:
        assert store[name] == store["base"], name
    assert store["strength"] != store["base"]
    assert store["img2img"] != store["base"]


def test_the_worker_builds_the_mask_spec() -> None:
    job = job_from_request(
        inpainting(
            image_base64=IMAGE,
            mask_image_base64=MASK,
            mask_blur=7,
            inpainting_full_res=True,
            inpainting_full_res_padding=30,
            inpainting_mask_invert=True,
            initial_noise_multiplier=0.25,
        )
    )
    assert job.mask is not None
    assert job.init_image is not None
    assert (job.mask.blur, job.mask.full_res, job.mask.full_res_padding) == (7, True, 30)
    assert (job.mask.invert, job.mask.initial_noise_multiplier) == (True, 0.25)
    assert job.mask.mask.mode == "L"
    assert job.init_image.size == job.mask.mask.size == (64, 64)
    with pytest.raises(JobError, match="mask is 32x32"):
        job_from_request(inpainting(image_base64=IMAGE, mask_image_base64=png((32, 32), "L", 255)))
