"""``POST /v3/async/txt2img``: Novita's fields and defaults, hires fix and refiner checks, the shared envelope."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save_file
from tests.support.api import KEY_A, auth, b64, image_bytes, make_services, record_of

from underpaint.api.app import create_app
from underpaint.api.idempotency import request_hash
from underpaint.engine.job import HiresFix, Refiner
from underpaint.services import Services
from underpaint.tasks.contract import TaskType, Txt2ImgRequest
from underpaint.tasks.types import ImageRecord
from underpaint.worker.jobs import job_from_request

PATH = "/v3/async/txt2img"
SDXL_KEYS = ["conditioner.embedders.1.model.x"]


@pytest.fixture
def refiner_models(models_dir: Path, tmp_path: Path) -> Path:
    """The API models folder plus an SDXL refiner checkpoint."""
    root = tmp_path / "models"
    shutil.copytree(models_dir, root)
    save_file(
        {k: np.zeros(1, dtype=np.float32) for k in SDXL_KEYS}, str(root / "checkpoint/sd_xl_refiner_1.0.safetensors")
    )
    return root


def app(services: Services) -> TestClient:
    return TestClient(create_app(services), raise_server_exceptions=False)


def post(client: TestClient, extra: Any = ..., headers: dict[str, str] | None = None, **request: Any) -> httpx.Response:
    body: dict[str, Any] = {"request": {"model_name": "dreamshaper_8.safetensors", "prompt": "a cat", **request}}
    if extra is not ...:
        body["extra"] = extra
    response: httpx.Response = client.post(PATH, json=body, headers=headers or auth())
    return response


def stored(services: Services, response: httpx.Response) -> Txt2ImgRequest:
    assert response.status_code == 200, response.text
    request = services.store.get_request(response.json()["task_id"])
    assert isinstance(request, Txt2ImgRequest)
    return request


def refused(response: httpx.Response, field: str) -> str:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["reason"] == "INVALID_REQUEST_BODY"
    assert body["metadata"].get("field") == field, body
    message: str = body["message"]
    assert message.startswith(field), message
    return message


def test_defaults_nulls_and_the_task_result_type(client: TestClient, services: Services) -> None:
    # The Python SDK sends every unset optional as null.
    nulls = {k: None for k in ("negative_prompt", "width", "height", "image_num", "steps", "guidance_scale",
                               "sampler_name", "seed", "sd_vae", "clip_skip", "loras", "embeddings", "hires_fix",
                               "refiner", "restore_faces", "enable_transparent_background")}  # fmt: skip
    r = post(client, **nulls)
    request = stored(services, r)
    assert (request.width, request.height, request.image_num, request.steps) == (512, 512, 1, 20)
    assert (request.guidance_scale, request.sampler_name, request.clip_skip) == (7.5, "Euler a", 1)
    assert (request.hires_fix, request.refiner, request.restore_faces) == (None, None, False)
    assert request.model_name == "dreamshaper_8.safetensors"
    assert 0 <= request.seed < 2**32  # -1 resolved at submit
    task_id = r.json()["task_id"]
    record = record_of(services, task_id)
    assert record.task_type is TaskType.TXT_TO_IMG
    assert record.seed == request.seed
    claimed = services.store.claim(task_id, "w")
    assert claimed is not None
    services.store.complete(task_id, "w", [ImageRecord(f"{task_id}/a.png", "png")])
    result = client.get("/v3/async/task-result", params={"task_id": task_id}, headers=auth()).json()
    assert result["task"]["task_type"] == "TXT_TO_IMG"
    assert result["task"]["status"] == "TASK_STATUS_SUCCEED"
    assert result["extra"]["seed"] == str(request.seed)


def test_every_field_reaches_the_engine_job(client: TestClient, services: Services, png_b64: str) -> None:
    r = post(
        client, negative_prompt="ugly", width=640, height=384, image_num=3, steps=12, guidance_scale=5, seed=77,
        sampler_name="dpm++ 2m karras", sd_vae="vae-ft-mse-840000", clip_skip=2,
        loras=[{"model_name": "add_detail", "strength": 0.4}], embeddings=[{"model_name": "easynegative"}],
        hires_fix={"target_width": 1280, "target_height": 768, "strength": 0.45, "upscaler": "latent"},
        controlnet={"units": [{"model_name": "control_v11p_sd15_canny", "image_base64": png_b64}]},
        ip_adapters=[{"model_name": "ip-adapter_sd15", "image_base64": png_b64, "strength": 0.3}],
    )  # fmt: skip
    job = job_from_request(stored(services, r))
    assert job.is_txt2img
    assert (job.width, job.height, job.image_num, job.steps, job.guidance_scale, job.seed) == (640, 384, 3, 12, 5, 77)
    assert (job.sampler_name, job.clip_skip, job.negative_prompt) == ("DPM++ 2M Karras", 2, "ugly")
    assert job.vae == "vae-ft-mse-840000.safetensors"
    assert job.loras[0].name == "add_detail.safetensors"
    assert job.embeddings[0].name == "easynegative.safetensors"
    assert job.controlnets[0].model == "control_v11p_sd15_canny.safetensors"
    assert job.ip_adapters[0].model == "ip-adapter_sd15.bin"
    assert job.hires_fix == HiresFix(1280, 768, 0.45, "Latent")
    assert job.refiner is None


def test_hires_fix_defaults_and_model_upscalers(client: TestClient, services: Services) -> None:
    request = stored(services, post(client, hires_fix={"target_width": 1024, "target_height": 1024}))
    assert request.hires_fix is not None
    assert (request.hires_fix.strength, request.hires_fix.upscaler) == (0.5, "Latent")  # the SDKs' defaults
    request = stored(
        services,
        post(client, hires_fix={"target_width": 512, "target_height": 768, "upscaler": "RealESRGAN_x4plus_anime_6B"}),
    )
    job = job_from_request(request)
    assert job.hires_fix == HiresFix(512, 768, 0.5, "RealESRGAN_x4plus_anime_6B.safetensors")


@pytest.mark.parametrize(
    ("hires", "field", "words"),
    [
        ({"target_width": 256, "target_height": 1024}, "request.hires_fix.target_width", "smaller than request.width"),
        ({"target_width": 1024, "target_height": 500}, "request.hires_fix.target_height", "at least the base size"),
        ({"target_width": 5000, "target_height": 1024}, "request.hires_fix.target_width", "between 128 and 4096"),
        ({"target_width": 1024}, "request.hires_fix.target_height", "is required"),
        ({"target_width": 1024, "target_height": 1024, "strength": 1.5}, "request.hires_fix.strength", "between"),
        ({"target_width": 1024, "target_height": 1024, "upscaler": "RealESRNet_x4plus"}, "request.hires_fix.upscaler",
         "unknown upscaler 'RealESRNet_x4plus'"),
    ],
)  # fmt: skip
def test_bad_hires_fix_is_a_400_naming_the_field(
    client: TestClient, services: Services, hires: dict[str, Any], field: str, words: str
) -> None:
    assert words in refused(post(client, hires_fix=hires), field)
    assert sum(services.store.count_by_status().values()) == 0


def test_a_refiner_needs_a_refiner_checkpoint(client: TestClient) -> None:
    message = refused(
        post(client, model_name="sd_xl_base_1.0.safetensors", refiner={"switch_at": 0.8}), "request.refiner"
    )
    assert "refiner_checkpoint" in message
    message = refused(
        post(client, model_name="sd_xl_base_1.0", refiner={"model_name": "nope.safetensors"}),
        "request.refiner.model_name",
    )
    assert "unknown checkpoint 'nope.safetensors'" in message


def test_the_refiner_comes_from_the_request_the_setting_or_its_name(refiner_models: Path, tmp_path: Path) -> None:
    services = make_services(refiner_models, tmp_path)
    with app(services) as client:
        job = job_from_request(stored(services, post(client, model_name="sd_xl_base_1.0", refiner={})))
        assert job.refiner == Refiner("sd_xl_refiner_1.0.safetensors", 0.5)  # found by name; SDK default switch_at
        request = stored(
            services,
            post(client, model_name="sd_xl_base_1.0", refiner={"switch_at": 0.7, "model_name": "sd_xl_base_1.0"}),
        )
        assert job_from_request(request).refiner == Refiner("sd_xl_base_1.0.safetensors", 0.7)
        message = refused(post(client, refiner={"switch_at": 0.5}), "request.refiner")  # an SD 1.5 checkpoint
        assert "'sd_xl_refiner_1.0.safetensors' is for SDXL 1.0 but checkpoint 'dreamshaper_8.safetensors'" in message
    services = make_services(refiner_models, tmp_path / "b", refiner_checkpoint="missing-refiner.safetensors")
    with app(services) as client:
        message = refused(post(client, model_name="sd_xl_base_1.0", refiner={}), "request.refiner")
        assert "'missing-refiner.safetensors'" in message


def test_hires_fix_refuses_another_kinds_file_in_the_upscaler_folder(models_dir: Path, tmp_path: Path) -> None:
    """A LoRA saved into models/upscaler/ is a 400 at submit, told from its tensor names (no task is created)."""
    root = tmp_path / "models"
    shutil.copytree(models_dir, root)
    save_file(
        {"lora_unet_down_blocks_0.lora_down.weight": np.zeros(1, dtype=np.float32)},
        str(root / "upscaler/4x-x.safetensors"),
    )
    services = make_services(root, tmp_path / "data")
    with app(services) as client:
        hires = {"target_width": 1024, "target_height": 1024, "upscaler": "4x-x"}
        message = refused(post(client, hires_fix=hires), "request.hires_fix.upscaler")
        assert "upscaler '4x-x' cannot be loaded: 4x-x.safetensors holds a LoRA's tensors" in message
        assert sum(services.store.count_by_status().values()) == 0


@pytest.mark.parametrize("flag", ["restore_faces", "enable_transparent_background"])
def test_features_without_a_model_are_refused_not_ignored(client: TestClient, services: Services, flag: str) -> None:
    asked: dict[str, Any] = {flag: True}
    assert "none is installed" in refused(post(client, **asked), f"request.{flag}")
    off: dict[str, Any] = {flag: False}
    assert stored(services, post(client, **off)).model_dump()[flag] is False


def test_the_envelope_is_img2imgs(client: TestClient, services: Services) -> None:
    extra = {"response_image_type": "jpg", "enable_nsfw_detection": True, "nsfw_detection_level": 2}
    r = post(client, extra=extra, headers={**auth(), "Idempotency-Key": "k1"})
    again = post(client, extra=extra, headers={**auth(), "Idempotency-Key": "k1"})
    assert again.json() == r.json()  # a retry gets the same task
    record = record_of(services, r.json()["task_id"])
    assert (record.response_image_type, record.enable_nsfw_detection, record.extra.nsfw_detection_level) == (
        "jpeg", True, 2,
    )  # fmt: skip
    assert record.lane == "sd15"
    small = post(client, width=100)
    assert (small.status_code, small.json()["reason"]) == (400, "INVALID_IMAGE_SIZE")
    assert "request.width: must be between 128 and 2048" in small.json()["message"]
    assert refused(post(client, prompt=""), "request.prompt")
    unknown = post(client, model_name="nope.safetensors")
    assert unknown.status_code == 400
    assert "unknown checkpoint" in unknown.json()["message"]
    bad_unit = post(client, controlnet={"units": [{"model_name": "control_v11p_sd15_canny", "image_base64": "%%"}]})
    assert bad_unit.status_code == 400
    assert "request.controlnet.units[0].image_base64" in bad_unit.json()["message"]
    assert client.post(PATH, json={"request": {"prompt": "x"}}, headers=auth("wrong")).status_code == 403


def test_one_idempotency_key_on_two_endpoints_is_a_conflict_not_a_replay(client: TestClient) -> None:
    body = {"request": {"model_name": "dreamshaper_8.safetensors", "prompt": "a cat"}}
    headers = {**auth(), "Idempotency-Key": "shared"}
    first = client.post(PATH, json=body, headers=headers)
    assert first.status_code == 200
    elsewhere = client.post("/v3/async/img2img", json=body, headers=headers)
    assert (elsewhere.status_code, elsewhere.json()["reason"]) == (409, "IDEMPOTENCY_KEY_REUSED")
    assert client.post(PATH, json=body, headers=headers).json() == first.json()  # the same endpoint still replays


def test_img2img_keys_hash_as_before_endpoints_were_scoped() -> None:
    body = {"request": {"prompt": "a cat", "model_name": "m"}}
    before = hashlib.sha256(b'{"request":{"model_name":"m","prompt":"a cat"}}').hexdigest()
    assert request_hash(body, TaskType.IMG_TO_IMG) == before  # a key recorded by an earlier version still replays
    assert request_hash(body, TaskType.TXT_TO_IMG) != before


def test_a_txt2img_task_never_batches_with_img2img(client: TestClient, services: Services) -> None:
    t2i = record_of(services, post(client, steps=20).json()["task_id"])
    body = {
        "request": {"model_name": "dreamshaper_8.safetensors", "prompt": "a cat", "image_base64": b64(image_bytes())}
    }
    i2i = record_of(services, client.post("/v3/async/img2img", json=body, headers=auth(KEY_A)).json()["task_id"])
    assert t2i.batch_key is not None
    assert i2i.batch_key is not None
    assert t2i.batch_key != i2i.batch_key
    assert t2i.model_key == i2i.model_key  # the same checkpoint: a worker that has it loaded prefers both
