"""The official Python SDK (novita-client 0.7.1), unchanged but for its base URL, against a live server."""

from __future__ import annotations

import base64
import io

import numpy as np
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


def test_async_inpainting_keeps_every_unmasked_pixel(live_server: LiveServer) -> None:
    """``async_inpainting`` as the SDK sends it (flags as bools, ``sd_vae`` "", nulls) on the 9-channel checkpoint;
    the result has the input's size (not a multiple of 8 here) and its pixels wherever the mask is black and far
    from the painted area."""
    client = NovitaClient("key-a", base_url=live_server.url)
    image_png = make_png((100, 76))
    mask = Image.new("L", (100, 76), 0)
    mask.paste(255, (30, 20, 60, 50))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    submitted = client.async_inpainting(
        model_name="tiny-sd15-inpainting.safetensors",
        image=base64.b64encode(image_png).decode(),
        mask=base64.b64encode(buf.getvalue()).decode(),
        prompt="a red apple",
        image_num=1,
        sampler_name="Euler a",
        steps=4,
        guidance_scale=7.0,
        seed=77,
        mask_blur=2,
        inpainting_full_res=True,
        inpainting_full_res_padding=8,
        response_image_type="png",
    )
    res = client.wait_for_task_v3(submitted.task_id)
    assert res.task.status.value == "TASK_STATUS_SUCCEED", res.task.reason
    assert res.task.task_type == "INPAINTING"
    res.download_images()
    out = Image.open(io.BytesIO(base64.b64decode(res.images_encoded[0])))
    assert out.size == (100, 76)
    assert "Inpaint area: Only masked" in out.info["parameters"]
    got = np.asarray(out.convert("RGB"))
    original = np.asarray(Image.open(io.BytesIO(image_png)).convert("RGB"))
    far = np.ones((76, 100), bool)
    far[20 - 8 : 50 + 8, 30 - 8 : 60 + 8] = False  # the mask grown by more than its blur's reach
    assert np.array_equal(got[far], original[far])
    assert not np.array_equal(got[~far], original[~far])
