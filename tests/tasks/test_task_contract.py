"""The typed task contract: stored requests round-trip, rows from before it still load, and the store's batch key
agrees with the engine's batching field by field."""

from __future__ import annotations

import base64
import dataclasses
import io
import itertools
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError
from sqlalchemy import insert
from tests.support.requests import img2img, txt2img

from underpaint.api.schemas import Img2ImgBody, parse_body
from underpaint.db.migrations import MIGRATIONS
from underpaint.db.schema import payloads_table, tasks_table
from underpaint.engine import job as engine_job
from underpaint.tasks.batching import UNBATCHABLE_SAMPLERS, BatchSignature, batch_key, model_key
from underpaint.tasks.contract import (
    Img2ImgRequest,
    TaskType,
    Txt2ImgRequest,
    dump_extra,
    dump_request,
    load_extra,
    load_request,
)
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import TaskStatus
from underpaint.wire.errors import ApiError
from underpaint.worker.jobs import job_from_request


def png(color: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (color, 0, 0)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# -- serialisation ------------------------------------------------------------------------------------------------


def test_each_endpoint_round_trips_through_its_stored_form() -> None:
    lora = [{"model_name": "l.safetensors", "strength": 0.3}]
    for request in (img2img(loras=lora, strength=0.7), txt2img(loras=lora, sampler_name="DDIM")):
        stored = dump_request(request)
        assert stored["task_type"] == request.task_type
        back = load_request(stored)
        assert type(back) is type(request)
        assert back == request
    assert isinstance(load_request(dump_request(txt2img())), Txt2ImgRequest)
    with pytest.raises(ValidationError):
        load_request({**dump_request(txt2img()), "task_type": "NOT_AN_ENDPOINT"})


def test_the_wire_checks_ranges_and_the_store_does_not_check_them_again() -> None:
    body = {"request": {"model_name": "m", "prompt": "p", "image_base64": png(1), "width": 64}}
    with pytest.raises(ApiError) as info:
        parse_body(Img2ImgBody, body)
    assert "request.width" in info.value.message
    # Accepted under other limits (or written at a tiny size by a test): still loads, as the worker must run it.
    loaded = load_request({**body["request"], "seed": 3})
    assert isinstance(loaded, Img2ImgRequest)
    assert loaded.width == 64


def test_extra_keeps_the_base_url_apart_from_the_clients_fields() -> None:
    extra = load_extra({"webhook": {"url": "https://h.example/x"}, "_base_url": "https://api.example"})
    assert extra.base_url == "https://api.example"
    assert extra.webhook_url == "https://h.example/x"
    assert "_base_url" not in extra.model_dump(by_alias=True)  # never echoed to clients
    assert load_extra(dump_extra(extra)) == extra
    assert load_extra(None).webhook_url is None


# -- rows from before the contract --------------------------------------------------------------------------------

# What the API stored before the contract: ``Img2ImgRequest.model_dump()`` with names and seed resolved (no
# ``task_type``), and ``extra`` with ``_base_url``.
OLD_PAYLOAD: dict[str, Any] = {
    "model_name": "dreamshaper_8.safetensors", "image_base64": png(7), "prompt": "a cat", "negative_prompt": "",
    "width": 512, "height": 512, "image_num": 2, "steps": 20, "guidance_scale": 7.5, "sampler_name": "DPM++ 2M Karras",
    "seed": 77, "sd_vae": None, "clip_skip": 1, "strength": 0.5,
    "loras": [{"model_name": "add_detail.safetensors", "strength": 0.4}], "embeddings": [], "controlnet": None,
    "ip_adapters": [],
}  # fmt: skip
OLD_EXTRA = {
    "response_image_type": "webp",
    "enable_nsfw_detection": True,
    "nsfw_detection_level": 1,
    "webhook": {"url": "https://hook.example/x"},
    "_base_url": "https://old.example",
}


def test_rows_stored_before_the_contract_still_load_and_run(db_url: str) -> None:
    old = SqlTaskStore(db_url, migrations=MIGRATIONS[:4])  # the schema before the task_type column
    row = dict(
        task_id="old", owner="o", status=TaskStatus.QUEUED.value, reason="", progress_percent=0, eta=0, seed=77,
        enable_nsfw_detection=True, response_image_type="webp", lane="sd15", priority=0, attempts=0, image_num=2,
        created_at=1.0, images=[], extra=OLD_EXTRA, batch_key=None, model_key=None,
    )  # fmt: skip
    with old.engine.begin() as conn:
        conn.execute(insert(tasks_table).values(row))
        conn.execute(insert(payloads_table).values(task_id="old", payload=OLD_PAYLOAD))
    old.close()

    store = SqlTaskStore(db_url)  # migrates
    try:
        record = store.get("old", "o")
        assert record is not None
        assert record.task_type is TaskType.IMG_TO_IMG
        assert record.extra.base_url == "https://old.example"
        assert record.extra.webhook_url == "https://hook.example/x"
        assert record.extra.nsfw_detection_level == 1
        request = store.get_request("old")
        assert isinstance(request, Img2ImgRequest)
        assert dump_request(request) == {**OLD_PAYLOAD, "task_type": "IMG_TO_IMG", "scheduler": None}
        claimed = store.claim(None, "w")
        assert claimed is not None
        assert claimed.task_id == "old"
        job = job_from_request(request)
        assert (job.seed, job.image_num, job.sampler_name, job.loras[0].strength) == (77, 2, "DPM++ 2M Karras", 0.4)
    finally:
        store.close()


# -- one batch compatibility ----------------------------------------------------------------------------------------

UNIT = {"model_name": "c.safetensors", "image_base64": png(1), "preprocessor": "canny", "guidance_end": 0.8}
ADAPTER = {"model_name": "ip.bin", "image_base64": png(1), "strength": 0.6}

# Fields that must be equal for two tasks to share a sampler call (the model, the schedule, the adapters' setup),
# each with a variant that changes it; and fields each task may have its own of.
SHARED: dict[str, dict[str, Any]] = {
    "model_name": {"model_name": "b.safetensors"},
    "width": {"width": 768},
    "height": {"height": 768},
    "steps": {"steps": 21},
    "sampler_name": {"sampler_name": "Euler"},
    "scheduler": {"scheduler": "Karras"},
    "strength": {"strength": 0.6},
    "clip_skip": {"clip_skip": 2},
    "sd_vae": {"sd_vae": "v.safetensors"},
    "loras": {"loras": [{"model_name": "l.safetensors", "strength": 0.5}]},
    "loras.strength": {"loras": [{"model_name": "l.safetensors", "strength": 0.9}]},
    "controlnet": {"controlnet": {"units": [UNIT]}},
    "controlnet.strength": {"controlnet": {"units": [UNIT | {"strength": 0.5}]}},
    "controlnet.preprocessor": {"controlnet": {"units": [UNIT | {"preprocessor": "none"}]}},
    "controlnet.guidance": {"controlnet": {"units": [UNIT | {"guidance_start": 0.1}]}},
    "ip_adapters": {"ip_adapters": [ADAPTER]},
    "ip_adapters.strength": {"ip_adapters": [ADAPTER | {"strength": 0.9}]},
}
PER_TASK: dict[str, dict[str, Any]] = {
    "prompt": {"prompt": "another"},
    "negative_prompt": {"negative_prompt": "ugly"},
    "seed": {"seed": 9},
    "image_num": {"image_num": 4},
    "guidance_scale": {"guidance_scale": 3.0},
    "embeddings": {"embeddings": [{"model_name": "x.pt"}]},
    "image_base64": {"image_base64": png(200)},
    "sampler_name spelling": {"sampler_name": "euler_a"},
    # Euler a walks the uniform schedule either way (A1111 <= 1.8 name, or >= 1.9 "Automatic" / "Uniform")
    "scheduler same schedule": {"scheduler": "uniform"},
    "controlnet image": {"controlnet": {"units": [UNIT | {"image_base64": png(90)}]}},
    "ip_adapters image": {"ip_adapters": [ADAPTER | {"image_base64": png(90)}]},
}


def test_every_request_field_is_classified() -> None:
    """A new field must be put in SHARED (and in ``BatchSignature``) or PER_TASK before this passes."""
    covered = {name.split(".")[0].split(" ")[0] for name in (*SHARED, *PER_TASK)}
    assert set(Img2ImgRequest.model_fields) - {"task_type"} == covered


def test_the_store_key_and_the_engine_key_separate_exactly_what_cannot_batch() -> None:
    base = {"model_name": "a.safetensors", "prompt": "a house", "image_base64": png(1), "seed": 1}
    with_cn = {"controlnet": {"units": [UNIT]}, "ip_adapters": [ADAPTER]}

    def request(**change: Any) -> Img2ImgRequest:  # validated as the API validates a client's request
        return Img2ImgRequest.model_validate(base | change)

    variants = {"base": request(), "base+adapters": request(**with_cn)}
    for name, change in SHARED.items():
        variants[name] = request(**change)
    for name, change in PER_TASK.items():
        extra = with_cn if name.startswith(("controlnet", "ip_adapters")) else {}
        variants[name] = request(**(extra | change))

    store_keys = {name: batch_key(r) for name, r in variants.items()}
    engine_keys = {name: engine_job.batch_key(job_from_request(r)) for name, r in variants.items()}
    assert None not in store_keys.values()
    for a, b in itertools.combinations(variants, 2):
        assert (store_keys[a] == store_keys[b]) == (engine_keys[a] == engine_keys[b]), (a, b)
    for name in SHARED:
        assert store_keys[name] != store_keys["base"], name
    for name in PER_TASK:
        reference = "base+adapters" if name.startswith(("controlnet", "ip_adapters")) else "base"
        assert store_keys[name] == store_keys[reference], name
    assert len({store_keys[name] for name in SHARED}) == len(SHARED)


HIRES = {"target_width": 1024, "target_height": 768}
REFINER = {"switch_at": 0.6, "model_name": "refiner.safetensors"}
TXT2IMG_SHARED: dict[str, dict[str, Any]] = {
    **{name: change for name, change in SHARED.items() if name != "strength"},
    "hires_fix": {"hires_fix": HIRES},
    "hires_fix.target": {"hires_fix": HIRES | {"target_height": 1024}},
    "hires_fix.strength": {"hires_fix": HIRES | {"strength": 0.3}},
    "hires_fix.upscaler": {"hires_fix": HIRES | {"upscaler": "up.pth"}},
    "refiner": {"refiner": REFINER},
    "refiner.switch_at": {"refiner": REFINER | {"switch_at": 0.8}},
    "refiner.model_name": {"refiner": REFINER | {"model_name": "other.safetensors"}},
}
# Refused at submit while no model for them is installed (api.submit): they never reach a batch.
TXT2IMG_REFUSED = {"restore_faces", "enable_transparent_background"}


def test_every_txt2img_field_is_classified() -> None:
    covered = {name.split(".")[0].split(" ")[0] for name in (*TXT2IMG_SHARED, *PER_TASK)} | TXT2IMG_REFUSED
    assert set(Txt2ImgRequest.model_fields) - {"task_type"} == covered - {"image_base64"}


def test_txt2img_store_and_engine_keys_agree() -> None:
    base = {"model_name": "a.safetensors", "prompt": "a house", "seed": 1}

    def request(**change: Any) -> Txt2ImgRequest:
        return Txt2ImgRequest.model_validate(base | change)

    variants = {"base": request(), "base+hires": request(hires_fix=HIRES)}
    variants |= {name: request(**change) for name, change in TXT2IMG_SHARED.items()}
    for name, change in PER_TASK.items():
        if name != "image_base64":
            extra = {"controlnet": {"units": [UNIT]}, "ip_adapters": [ADAPTER]} if " image" in name else {}
            variants[name] = request(**(extra | change))
    store_keys = {name: batch_key(r) for name, r in variants.items()}
    engine_keys = {name: engine_job.batch_key(job_from_request(r)) for name, r in variants.items()}
    for a, b in itertools.combinations(variants, 2):
        assert (store_keys[a] == store_keys[b]) == (engine_keys[a] == engine_keys[b]), (a, b)
    assert len({store_keys[name] for name in TXT2IMG_SHARED} | {store_keys["base"]}) == len(TXT2IMG_SHARED) + 1
    for name in ("prompt", "negative_prompt", "seed", "image_num", "guidance_scale", "embeddings"):
        assert store_keys[name] == store_keys["base"], name


def test_unbatchable_samplers_never_share_a_call() -> None:
    for sampler in UNBATCHABLE_SAMPLERS:
        request = img2img(image_base64=png(1), sampler_name=sampler)
        assert batch_key(request) is None
        one, two = job_from_request(request), job_from_request(request)
        assert engine_job.batch_key(one) != engine_job.batch_key(two)


def test_endpoints_never_share_a_call_and_model_keys_follow_checkpoint_and_loras() -> None:
    assert batch_key(txt2img()) != batch_key(img2img())
    lora = [{"model_name": "l.safetensors", "strength": 0.5}]
    assert model_key(img2img(width=768, steps=3)) == model_key(img2img()) == model_key(txt2img())
    assert model_key(img2img(loras=lora)) != model_key(img2img())
    assert model_key(img2img(model_name="b.safetensors")) != model_key(img2img())


def test_the_signature_covers_the_engines_shared_batch_spec() -> None:
    """Everything ``pipeline.sample_batch`` shares across a batch (its ``BatchSpec``) is part of the signature."""
    from underpaint.engine.pipeline import BatchSpec

    signature = {f.name for f in dataclasses.fields(BatchSignature)}
    named = {"sampler_name": "sampler", "txt2img": "task_type"}  # the spec's names for the signature's fields
    spec = {named.get(f.name, f.name) for f in dataclasses.fields(BatchSpec)}
    assert spec <= signature
