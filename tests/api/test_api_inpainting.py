"""``POST /v3/async/inpainting``: Novita's fields as both SDKs send them, the stored request, and bad input as a
400 naming the field."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from tests.support.api import KEY_A, auth, b64, image_bytes

from underpaint.services import Services
from underpaint.tasks.contract import InpaintingRequest

PATH = "/v3/async/inpainting"
IMAGE = b64(image_bytes((100, 75)))
WHITE = b64(image_bytes((100, 75), mode="L", color=255))
BLACK = b64(image_bytes((100, 75), mode="L", color=0))


def post(client: TestClient, body_extra: Any = ..., **request: Any) -> httpx.Response:
    req: dict[str, Any] = {
        "model_name": "sd15-inpainting.safetensors",
        "image_base64": IMAGE,
        "mask_image_base64": WHITE,
        "prompt": "a cat",
    }
    payload: dict[str, Any] = {"request": req | request}
    if body_extra is not ...:
        payload["extra"] = body_extra
    response: httpx.Response = client.post(PATH, json=payload, headers=auth(KEY_A))
    return response


def stored(services: Services, response: httpx.Response) -> InpaintingRequest:
    assert response.status_code == 200, response.text
    request = services.store.get_request(response.json()["task_id"])
    assert isinstance(request, InpaintingRequest)
    return request


def test_the_python_sdk_body_is_accepted(client: TestClient, services: Services) -> None:
    """What ``novita-client``'s ``async_inpainting`` sends: bools, ``sd_vae`` "", nulls, the nested extra."""
    sdk_extra = {
        "response_image_type": "jpeg",
        "enable_nsfw_detection": False,
        "nsfw_detection_level": 0,
        "custom_storage": {},
        "enterprise_plan": {},
    }
    response = post(
        client,
        body_extra=sdk_extra,
        negative_prompt="",
        image_num=1,
        steps=4,
        guidance_scale=7.5,
        seed=-1,
        sampler_name="Euler a",
        mask_blur=None,
        sd_vae="",
        loras=None,
        embeddings=None,
        clip_skip=None,
        strength=None,
        inpainting_full_res=True,
        inpainting_full_res_padding=8,
        inpainting_mask_invert=False,
        initial_noise_multiplier=0.5,
        extra={},  # the SDK's nested request.extra
    )
    r = stored(services, response)
    assert r.model_name == "sd15-inpainting.safetensors"
    assert (r.width, r.height) == (96, 72)  # the processing size: the image's, rounded down to multiples of 8
    assert r.seed >= 0
    assert r.sd_vae is None
    assert (r.strength, r.mask_blur, r.clip_skip) == (1.0, 4, 1)
    assert r.inpainting_full_res is True
    result = client.get(f"/v3/async/task-result?task_id={response.json()['task_id']}", headers=auth(KEY_A)).json()
    assert result["task"]["task_type"] == "INPAINTING"
    assert result["task"]["status"] == "TASK_STATUS_QUEUED"


def test_flags_as_numbers_and_width_height_ignored(client: TestClient, services: Services) -> None:
    r = stored(services, post(client, inpainting_full_res=1, inpainting_mask_invert=0, width=512, height=512))
    assert r.inpainting_full_res is True
    assert r.inpainting_mask_invert is False
    assert (r.width, r.height) == (96, 72)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"inpainting_full_res": 2}, "request.inpainting_full_res"),
        ({"mask_blur": 65}, "request.mask_blur"),
        ({"inpainting_full_res_padding": 257}, "request.inpainting_full_res_padding"),
        ({"initial_noise_multiplier": 1.6}, "request.initial_noise_multiplier"),
        ({"strength": 1.2}, "request.strength"),
        ({"mask_image_base64": None}, "request.mask_image_base64"),
        ({"mask_image_base64": "bm90IGFuIGltYWdl"}, "request.mask_image_base64"),
        ({"mask_image_base64": b64(image_bytes((75, 100), mode="L", color=255))}, "request.mask_image_base64"),
        ({"mask_image_base64": BLACK}, "request.mask_image_base64"),
        ({"mask_image_base64": WHITE, "inpainting_mask_invert": True}, "request.mask_image_base64"),
        ({"image_base64": b64(image_bytes((40, 40)))}, "request.image_base64"),
        ({"model_name": "nope.safetensors"}, "request.model_name"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(client: TestClient, change: dict[str, Any], field: str) -> None:
    response = post(client, **change)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["metadata"]["field"] == field
    assert error["message"].startswith(field)


def test_the_mask_messages_say_what_is_wrong(client: TestClient) -> None:
    other = post(client, mask_image_base64=b64(image_bytes((75, 100), mode="L", color=255))).json()["message"]
    assert "75x100" in other
    assert "100x75" in other
    assert "empty" in post(client, mask_image_base64=BLACK).json()["message"]
    inverted = post(client, mask_image_base64=BLACK, inpainting_mask_invert=True)
    assert inverted.status_code == 200  # black inverted: everything is repainted


def test_controlnet_and_ip_adapter_units_are_additive_fields(client: TestClient, services: Services) -> None:
    unit = {"model_name": "control_v11p_sd15_canny", "image_base64": IMAGE, "preprocessor": "none"}
    adapter = {"model_name": "ip-adapter_sd15", "image_base64": IMAGE, "strength": 0.5}
    r = stored(services, post(client, controlnet={"units": [unit]}, ip_adapters=[adapter]))
    assert r.controlnet is not None
    assert r.controlnet.units[0].model_name == "control_v11p_sd15_canny.safetensors"
    assert r.ip_adapters[0].model_name == "ip-adapter_sd15.bin"


def test_openapi_documents_the_route(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    operation = doc["paths"][PATH]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InpaintingBody"
    }
    schemas = doc["components"]["schemas"]
    fields = schemas["InpaintingRequest"]["properties"]
    assert {"image_base64", "mask_image_base64"} <= set(schemas["InpaintingRequest"]["required"])
    assert "width" not in fields
    assert "height" not in fields
    assert fields["inpainting_full_res"]["anyOf"] == [{"type": "boolean"}, {"type": "integer", "enum": [0, 1]}]
    assert (fields["mask_blur"]["minimum"], fields["mask_blur"]["maximum"]) == (0, 64)
    assert (fields["initial_noise_multiplier"]["maximum"], fields["strength"]["default"]) == (1.5, 1.0)
    assert {"200", "400", "403", "429", "500"} <= set(operation["responses"])
