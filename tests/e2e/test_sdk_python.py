"""The official Python SDK (novita-client 0.7.1), unchanged but for its base URL, against a live server."""

from __future__ import annotations

import base64
import io

import pytest
from novita_client import NovitaClient
from novita_client.exceptions import NovitaResponseError
from novita_client.proto import Txt2ImgV3HiresFix
from PIL import Image
from tests.support.server import LiveServer, make_png


def test_img2img_v3_and_wait_for_task(live_server: LiveServer) -> None:
    client = NovitaClient("key-a", base_url=live_server.url)
    init = Image.open(io.BytesIO(make_png()))
    res = client.img2img_v3(
        model_name="tiny-sd15.safetensors",
        input_image=init,
        prompt="a lighthouse, (sunset:1.2)",
        image_num=2,
        width=128,
        height=160,
        steps=6,
        seed=1234,
        sampler_name="DPM++ 2M Karras",
        strength=0.7,
        response_image_type="png",
    )
    assert res.task.status.value == "TASK_STATUS_SUCCEED", res.task.reason
    assert res.extra.seed == 1234
    assert len(res.images) == 2
    assert len(res.images_encoded) == 2
    for encoded in res.images_encoded:
        img = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert img.size == (128, 160)
        assert "Sampler: DPM++ 2M Karras" in img.info["parameters"]


def test_txt2img_v3_with_hires_fix(live_server: LiveServer) -> None:
    client = NovitaClient("key-a", base_url=live_server.url)
    res = client.txt2img_v3(
        model_name="tiny-sd15.safetensors",
        prompt="a lighthouse at dusk",
        image_num=2,
        width=128,
        height=128,
        steps=4,
        seed=99,
        sampler_name="Euler a",
        hires_fix=Txt2ImgV3HiresFix(target_width=192, target_height=160, strength=0.5, upscaler="Latent"),
        response_image_type="png",
    )
    assert res.task.status.value == "TASK_STATUS_SUCCEED", res.task.reason
    assert res.extra.seed == 99
    assert len(res.images_encoded) == 2
    for encoded in res.images_encoded:
        img = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert img.size == (192, 160)  # the hires target
        assert "Hires upscaler: Latent" in img.info["parameters"]
    raw = client.async_task_result(res.task.task_id)
    assert raw.task.task_type == "TXT_TO_IMG"


def test_python_sdk_sees_errors_and_models(live_server: LiveServer) -> None:
    client = NovitaClient("key-a", base_url=live_server.url)
    models = client.models_v3(refresh=True)
    names = [m.sd_name for m in models]
    assert "tiny-sd15.safetensors" in names
    assert len(names) == len(set((m.sd_name, m.type.name) for m in models)), "models_v3 must list each model once"
    with pytest.raises(NovitaResponseError, match="404"):  # an unknown task is an error
        client.async_task_result("no-such-task")
