"""Request validation of POST /v3/async/img2img: ranges, defaults, nulls, SDK bodies, model names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from tests.support.api import KEY_A, Submit, auth, body, make_services, queued, record_of, write_models

from underpaint.api.app import create_app
from underpaint.services import Services
from underpaint.tasks.contract import CustomStorageIn, EnterprisePlanIn, TaskType, dump_request
from underpaint.tasks.types import TaskRecord
from underpaint.vocabulary import PREPROCESSOR_FILES, PREPROCESSOR_NAMES, PreprocessorName

PY_SDK_EXTRA = {
    "response_image_type": "jpeg",
    "enable_nsfw_detection": False,
    "nsfw_detection_level": 0,
    "custom_storage": {},
    "enterprise_plan": {},
}


def python_sdk_body(image: str) -> dict[str, Any]:
    """The body novita-client 0.7.1 ``img2img_v3`` sends (wire contract §1.3), with our model names."""
    return {
        "extra": dict(PY_SDK_EXTRA),
        "request": {
            "model_name": "dreamshaper_8.safetensors",
            "image_base64": image,
            "prompt": "a cat",
            "width": 512,
            "height": 512,
            "negative_prompt": None,
            "sd_vae": None,
            "loras": [{"model_name": "add_detail", "strength": 0.7}],
            "embeddings": [{"model_name": "easynegative"}],
            "seed": -1,
            "image_num": 1,
            "steps": None,
            "clip_skip": None,
            "guidance_scale": 7.5,
            "strength": 0.5,
            "sampler_name": "Euler a",
            "extra": {},
            "controlnet": {
                "units": [
                    {
                        "model_name": "control_v11p_sd15_canny",
                        "image_base64": image,
                        "strength": 0.8,
                        "preprocessor": "canny",
                        "guidance_start": 0,
                        "guidance_end": 1,
                    }
                ]
            },
        },
    }


def stored(services: Services, response: httpx.Response) -> tuple[dict[str, Any], TaskRecord]:
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]
    # The request as the store keeps it (``dump_request``), read back through the typed contract.
    return dump_request(services.store.get_request(task_id)), record_of(services, task_id)


def test_python_sdk_body_is_accepted_with_defaults_and_resolved_names(
    client: TestClient, services: Services, png_b64: str
) -> None:
    r = client.post("/v3/async/img2img", json=python_sdk_body(png_b64), headers=auth())
    payload, record = stored(services, r)
    assert set(r.json()) == {"task_id"}
    assert payload["steps"] == 20
    assert payload["clip_skip"] == 1
    assert payload["negative_prompt"] == ""
    assert payload["sd_vae"] is None
    assert payload["loras"] == [{"model_name": "add_detail.safetensors", "strength": 0.7}]
    assert payload["embeddings"] == [{"model_name": "easynegative.safetensors"}]
    unit = payload["controlnet"]["units"][0]
    assert unit["model_name"] == "control_v11p_sd15_canny.safetensors"
    assert unit["preprocessor"] == "canny"
    assert unit["strength"] == 0.8
    assert unit["image_base64"] == png_b64  # kept as sent, not re-encoded
    assert payload["image_base64"] == png_b64
    assert "extra" not in payload  # request.extra is ignored
    assert record.response_image_type == "jpeg"
    assert 0 <= record.seed < 2**32 - 1
    assert payload["seed"] == record.seed
    assert queued(services) == [(record.task_id, "sd15")]


def test_raw_python_call_with_extra_null(client: TestClient, services: Services, png_b64: str) -> None:
    data = python_sdk_body(png_b64)
    data["extra"] = None
    _, record = stored(services, client.post("/v3/async/img2img", json=data, headers=auth()))
    assert record.response_image_type == "png"


def test_defaults_when_fields_absent(submit: Submit, services: Services) -> None:
    payload, record = stored(services, submit())
    expected = {
        "steps": 20,
        "image_num": 1,
        "guidance_scale": 7.5,
        "sampler_name": "Euler a",
        "strength": 0.5,
        "width": 512,
        "height": 512,
        "clip_skip": 1,
        "negative_prompt": "",
        "loras": [],
        "embeddings": [],
        "ip_adapters": [],
        "controlnet": None,
    }
    assert {k: payload[k] for k in expected} == expected
    assert record.response_image_type == "png"
    assert record.enable_nsfw_detection is False
    assert record.extra.nsfw_detection_level == 0
    assert record.extra.base_url == "http://testserver"
    assert record.task_type is TaskType.IMG_TO_IMG


def test_explicit_nulls_everywhere(submit: Submit, services: Services) -> None:
    nulls: dict[str, Any] = {
        k: None
        for k in (
            "negative_prompt", "width", "height", "image_num", "steps", "guidance_scale", "sampler_name", "seed",
            "scheduler", "sd_vae", "clip_skip", "strength", "loras", "embeddings", "controlnet", "ip_adapters",
        )
    }  # fmt: skip
    extra = {k: None for k in ("response_image_type", "webhook", "custom_storage", "enterprise_plan")}
    extra |= {"enable_nsfw_detection": None, "nsfw_detection_level": None}
    payload, _ = stored(services, submit(extra=extra, **nulls))
    assert payload["steps"] == 20
    assert payload["width"] == 512
    assert payload["loras"] == []


def test_unknown_keys_ignored(submit: Submit, services: Services) -> None:
    r = submit(extra={"unknown": 1, "response_image_type": "webp"}, refiner={"switch_at": 0.5}, foo="bar")
    _, record = stored(services, r)
    assert record.response_image_type == "webp"


def test_explicit_seed_is_kept(submit: Submit, services: Services) -> None:
    payload, record = stored(services, submit(seed=12345))
    assert record.seed == 12345
    assert payload["seed"] == 12345


def test_random_seeds_differ(submit: Submit, services: Services) -> None:
    seeds = {stored(services, submit())[1].seed for _ in range(5)}
    assert len(seeds) > 1


def _check(r: httpx.Response, field: str, reason: str = "INVALID_REQUEST_BODY") -> None:
    assert r.status_code == 400, r.text
    data = r.json()
    assert data["code"] == 400, data
    assert data["reason"] == reason, data
    assert data["message"].startswith(field + ":"), data["message"]
    assert data["metadata"]["field"] == field


RANGE_CASES = [
    ("prompt", "", "request.prompt"),
    ("prompt", "x" * 1025, "request.prompt"),
    ("negative_prompt", "x" * 1025, "request.negative_prompt"),
    ("image_num", 0, "request.image_num"),
    ("image_num", 9, "request.image_num"),
    ("steps", 0, "request.steps"),
    ("steps", 101, "request.steps"),
    ("guidance_scale", 0.5, "request.guidance_scale"),
    ("guidance_scale", 30.5, "request.guidance_scale"),
    ("clip_skip", 0, "request.clip_skip"),
    ("clip_skip", 13, "request.clip_skip"),
    ("strength", -0.1, "request.strength"),
    ("strength", 1.01, "request.strength"),
    ("seed", -2, "request.seed"),
    ("seed", 2**32, "request.seed"),
    ("steps", "many", "request.steps"),
    ("steps", 2.5, "request.steps"),
    ("prompt", 5, "request.prompt"),
    ("sampler_name", "Euler b", "request.sampler_name"),
    ("scheduler", "Lineal", "request.scheduler"),
    ("scheduler", 3, "request.scheduler"),
    ("loras", [{"model_name": "add_detail", "strength": 1.5}], "request.loras[0].strength"),
    ("loras", [{"model_name": "add_detail", "strength": -0.5}], "request.loras[0].strength"),
    ("loras", [{"model_name": "add_detail", "strength": 0.5}] * 6, "request.loras"),
    ("loras", [{"strength": 0.5}], "request.loras[0].model_name"),
    ("loras", {"model_name": "add_detail"}, "request.loras"),
    ("embeddings", [{"model_name": "easynegative"}] * 6, "request.embeddings"),
    ("ip_adapters", [{"model_name": "ip-adapter_sd15", "image_base64": "x", "strength": 0.5}] * 2, "request.ip_adapters"),
    ("ip_adapters", [{"model_name": "ip-adapter_sd15", "image_base64": "x", "strength": 2}], "request.ip_adapters[0].strength"),
    ("controlnet", {"units": []}, "request.controlnet"),
    ("controlnet", {}, "request.controlnet.units"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "value", "field"), RANGE_CASES)
def test_range_and_type_errors(submit: Submit, name: str, value: Any, field: str) -> None:
    _check(submit(**{name: value}), field)


@pytest.mark.parametrize("name", ["width", "height"])
@pytest.mark.parametrize("value", [127, 2049, 0])
def test_size_out_of_range_is_invalid_image_size(submit: Submit, name: str, value: int) -> None:
    size: dict[str, Any] = {name: value}  # typed for ``**``: Submit also takes ``key`` and ``image``
    r = submit(**size)
    _check(r, f"request.{name}", "INVALID_IMAGE_SIZE")
    assert "between 128 and 2048" in r.json()["message"]


@pytest.mark.parametrize("missing", ["model_name", "image_base64", "prompt"])
def test_required_request_fields(client: TestClient, png_b64: str, missing: str) -> None:
    req = {"model_name": "dreamshaper_8.safetensors", "image_base64": png_b64, "prompt": "a cat"}
    del req[missing]
    r = client.post("/v3/async/img2img", json={"request": req}, headers=auth())
    _check(r, f"request.{missing}")
    assert "is required" in r.json()["message"]


@pytest.mark.parametrize("value", [None, 5, [1]])
def test_request_object_required(client: TestClient, value: object) -> None:
    r = client.post("/v3/async/img2img", json={"request": value}, headers=auth())
    _check(r, "request")


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_malformed_bodies(client: TestClient, raw: bytes) -> None:
    r = client.post("/v3/async/img2img", content=raw, headers=auth() | {"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["reason"] == "INVALID_REQUEST_BODY"


def test_body_without_json_content_type_is_parsed(client: TestClient, png_b64: str) -> None:
    import json

    data = json.dumps({"request": {"model_name": "dreamshaper_8", "image_base64": png_b64, "prompt": "x"}})
    r = client.post("/v3/async/img2img", content=data, headers=auth() | {"Content-Type": "text/plain"})
    assert r.status_code == 200, r.text


def test_empty_negative_prompt_accepted(submit: Submit, services: Services) -> None:
    payload, _ = stored(services, submit(negative_prompt=""))
    assert payload["negative_prompt"] == ""


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("Euler a", "Euler a"),
        ("euler A", "Euler a"),
        ("DPM++ 2M Karras", "DPM++ 2M Karras"),
        ("dpm++ 2m karras", "DPM++ 2M Karras"),
        ("DPM++2M  Karras", "DPM++ 2M Karras"),
        ("dpm_adaptive", "DPM adaptive"),
        ("DPM++ Karras", "DPM++ 2M Karras"),
        ("unipc", "UniPC"),
        ("DDIM", "DDIM"),
    ],
)
def test_sampler_names(submit: Submit, services: Services, given: str, canonical: str) -> None:
    payload, _ = stored(services, submit(sampler_name=given))
    assert payload["sampler_name"] == canonical


def test_all_documented_samplers_accepted(submit: Submit, services: Services) -> None:
    from underpaint.vocabulary import SAMPLER_NAMES

    assert len(SAMPLER_NAMES) == 30  # the 20 Novita documents, then A1111 1.6's DPM++ 2M/3M SDE and Restart
    for name in SAMPLER_NAMES:
        payload, _ = stored(services, submit(sampler_name=name))
        assert payload["sampler_name"] == name


@pytest.mark.parametrize(
    ("sampler", "scheduler", "stored_as"),
    [
        ("DPM++ 2M SDE Karras", None, ("DPM++ 2M SDE Karras", None)),  # civitai's A1111 1.6 infotexts
        ("dpm++ sde exponential", None, ("DPM++ SDE Exponential", None)),
        ("DPM++ 2M", "karras", ("DPM++ 2M", "Karras")),  # A1111 >= 1.9's separate "Schedule type"
        ("Euler a", "sgm_uniform", ("Euler a", "SGM Uniform")),
        ("Restart", "Automatic", ("Restart", "Automatic")),
    ],
)
def test_sampler_names_and_schedule_types(
    submit: Submit, services: Services, sampler: str, scheduler: str | None, stored_as: tuple[str, str | None]
) -> None:
    payload, _ = stored(services, submit(sampler_name=sampler, scheduler=scheduler))
    assert (payload["sampler_name"], payload["scheduler"]) == stored_as


def _unit(image: str, **kw: Any) -> dict[str, Any]:
    return {"model_name": "control_v11p_sd15_canny", "image_base64": image} | kw


@pytest.mark.parametrize(
    ("preprocessor", "stored_as"),
    [("canny", "canny"), (" Shuffle", "shuffle"), ("binary", "binary"), ("none", None), (None, None)],
)
def test_weight_free_preprocessors(
    submit: Submit, services: Services, png_b64: str, preprocessor: str | None, stored_as: str | None
) -> None:
    payload, _ = stored(services, submit(controlnet={"units": [_unit(png_b64, preprocessor=preprocessor)]}))
    unit = payload["controlnet"]["units"][0]
    assert unit["preprocessor"] == stored_as
    assert (unit["strength"], unit["guidance_start"], unit["guidance_end"]) == (1.0, 0.0, 1.0)


@pytest.mark.parametrize("name", ["magic", "tile_colorfix+sharp", "segmentation", "reference_only", "inpaint"])
def test_preprocessors_this_server_does_not_run_are_refused(submit: Submit, png_b64: str, name: str) -> None:
    r = submit(controlnet={"units": [_unit(png_b64, preprocessor=name)]})
    _check(r, "request.controlnet.units[0].preprocessor")
    message = r.json()["message"]
    assert f"unknown preprocessor '{name}'" in message
    assert all(known in message for known in PREPROCESSOR_NAMES)


@pytest.mark.parametrize(("name", "stored_as"), [("softedge_hed", "softedge_hed"), ("Depth_Leres++", "depth_leres++")])
def test_network_preprocessors_need_their_weights(tmp_path: Path, png_b64: str, name: str, stored_as: str) -> None:
    models = write_models(tmp_path / "models")
    services = make_services(models, tmp_path)
    client = TestClient(create_app(services))

    def post() -> httpx.Response:
        units = [_unit(png_b64, preprocessor=name)]
        response: httpx.Response = client.post(
            "/v3/async/img2img", json=body(png_b64, controlnet={"units": units}), headers=auth()
        )
        return response

    r = post()
    _check(r, "request.controlnet.units[0].preprocessor")
    files = PREPROCESSOR_FILES[PreprocessorName(stored_as)]
    assert all(f in r.json()["message"] for f in files)
    (models / "annotator").mkdir(exist_ok=True)
    for f in files:
        (models / "annotator" / f).write_bytes(b"weights")
    payload, _ = stored(services, post())
    assert payload["controlnet"]["units"][0]["preprocessor"] == stored_as


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"guidance_start": 0.6, "guidance_end": 0.4}, "request.controlnet.units[0]"),
        ({"guidance_start": 0.5, "guidance_end": 0.5}, "request.controlnet.units[0]"),
        ({"guidance_start": -0.1}, "request.controlnet.units[0].guidance_start"),
        ({"guidance_end": 1.1}, "request.controlnet.units[0].guidance_end"),
        ({"strength": 1.5}, "request.controlnet.units[0].strength"),
    ],
)
def test_controlnet_unit_ranges(submit: Submit, png_b64: str, kw: dict[str, Any], field: str) -> None:
    _check(submit(controlnet={"units": [_unit(png_b64, **kw)]}), field)


@pytest.mark.parametrize(("given", "expected"), [("png", "png"), ("webp", "webp"), ("jpeg", "jpeg"), ("jpg", "jpeg"),
                                                 ("JPEG", "jpeg")])  # fmt: skip
def test_response_image_type(submit: Submit, services: Services, given: str, expected: str) -> None:
    _, record = stored(services, submit(extra={"response_image_type": given}))
    assert record.response_image_type == expected


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"response_image_type": "gif"}, "extra.response_image_type"),
        ({"nsfw_detection_level": 3}, "extra.nsfw_detection_level"),
        ({"nsfw_detection_level": -1}, "extra.nsfw_detection_level"),
        ({"enable_nsfw_detection": "maybe"}, "extra.enable_nsfw_detection"),
        ({"enable_nsfw_detection": [True]}, "extra.enable_nsfw_detection"),
        ({"enterprise_plan": {"enabled": "sure"}}, "extra.enterprise_plan.enabled"),
        ({"custom_storage": {"aws_s3": {"region": "us-east-1", "bucket": "b"}}}, "extra.custom_storage.aws_s3.path"),
        ({"custom_storage": {"aws_s3": {"region": "r", "bucket": "b", "path": "p", "save_to_path_directly": "x"}}},
         "extra.custom_storage.aws_s3.save_to_path_directly"),
        ({"webhook": {}}, "extra.webhook.url"),
        ({"webhook": {"url": "ftp://x"}}, "extra.webhook.url"),
        ({"webhook": {"url": "https://x", "test_mode": {"enabled": True, "return_task_status": "DONE"}}},
         "extra.webhook.test_mode.return_task_status"),
        ("junk", "extra"),
    ],
)  # fmt: skip
def test_extra_errors(submit: Submit, extra: object, field: str) -> None:
    _check(submit(extra=extra), field)


def test_nsfw_flags_and_accepted_extra_stored(submit: Submit, services: Services) -> None:
    extra = {
        "enable_nsfw_detection": True,
        "nsfw_detection_level": 2,
        "custom_storage": {},
        "enterprise_plan": {"enabled": False},
    }
    _, record = stored(services, submit(extra=extra))
    assert record.enable_nsfw_detection is True
    assert record.extra.nsfw_detection_level == 2
    assert record.extra.custom_storage == CustomStorageIn()
    assert record.extra.enterprise_plan == EnterprisePlanIn(enabled=False)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"model_name": "nope.safetensors"}, "request.model_name"),
        ({"sd_vae": "nope.vae"}, "request.sd_vae"),
        ({"loras": [{"model_name": "nope", "strength": 1}]}, "request.loras[0].model_name"),
        ({"embeddings": [{"model_name": "nope"}]}, "request.embeddings[0].model_name"),
    ],
)
def test_unknown_model_names(submit: Submit, kw: dict[str, Any], field: str) -> None:
    r = submit(**kw)
    _check(r, field)
    assert "GET /v3/model?filter.types=" in r.json()["message"]
    assert "nope" in r.json()["message"]


def test_unknown_controlnet_and_ipadapter(submit: Submit, png_b64: str) -> None:
    r = submit(controlnet={"units": [{"model_name": "nope", "image_base64": png_b64}]})
    _check(r, "request.controlnet.units[0].model_name")
    r = submit(ip_adapters=[{"model_name": "nope", "image_base64": png_b64, "strength": 0.5}])
    _check(r, "request.ip_adapters[0].model_name")


@pytest.mark.parametrize(
    "name", ["dreamshaper_8.safetensors", "dreamshaper_8", "DreamShaper_8.safetensors", "dreamshaper_8.ckpt"]
)
def test_checkpoint_name_forms(submit: Submit, services: Services, name: str) -> None:
    payload, _ = stored(services, submit(model_name=name))
    assert payload["model_name"] == "dreamshaper_8.safetensors"


def test_sdxl_stack_resolves(submit: Submit, services: Services, png_b64: str) -> None:
    r = submit(
        model_name="sd_xl_base_1.0.safetensors",
        sd_vae="vae-ft-mse-840000",
        loras=[{"model_name": "xl_detail", "strength": 0.3}],
        embeddings=[{"model_name": "unaestheticXL"}],
        controlnet={"units": [{"model_name": "controlnet-canny-sdxl-1.0", "image_base64": png_b64}]},
        ip_adapters=[{"model_name": "ip-adapter_sdxl.bin", "image_base64": png_b64, "strength": 0.6}],
    )
    payload, _ = stored(services, r)
    assert payload["sd_vae"] == "vae-ft-mse-840000.safetensors"
    assert payload["ip_adapters"][0]["model_name"] == "ip-adapter_sdxl.bin"
    assert payload["controlnet"]["units"][0]["model_name"] == "controlnet-canny-sdxl-1.0.safetensors"


@pytest.mark.parametrize(
    ("kw", "field", "label"),
    [
        ({"loras": [{"model_name": "xl_detail", "strength": 1}]}, "request.loras[0].model_name", "LoRA"),
        ({"embeddings": [{"model_name": "unaestheticXL"}]}, "request.embeddings[0].model_name", "embedding"),
    ],
)
def test_wrong_base_model_sd15_checkpoint(submit: Submit, kw: dict[str, Any], field: str, label: str) -> None:
    r = submit(**kw)
    _check(r, field)
    msg = r.json()["message"]
    assert label in msg
    assert "SDXL 1.0" in msg
    assert "SD 1.5" in msg


def test_wrong_base_controlnet_and_ipadapter_on_sdxl(submit: Submit, png_b64: str) -> None:
    xl = "sd_xl_base_1.0.safetensors"
    r = submit(
        model_name=xl, controlnet={"units": [{"model_name": "control_v11p_sd15_canny", "image_base64": png_b64}]}
    )
    _check(r, "request.controlnet.units[0].model_name")
    r = submit(model_name=xl, ip_adapters=[{"model_name": "ip-adapter_sd15", "image_base64": png_b64, "strength": 1}])
    _check(r, "request.ip_adapters[0].model_name")
    r = submit(model_name=xl, loras=[{"model_name": "add_detail", "strength": 1}])
    _check(r, "request.loras[0].model_name")


def test_enterprise_plan_routes_to_dedicated_lane(submit: Submit, services: Services) -> None:
    _, record = stored(services, submit(extra={"enterprise_plan": {"enabled": True}}))
    assert queued(services)[-1] == (record.task_id, "enterprise.gold")
    # the NewTask carried lane and priority
    assert record.lane == "enterprise.gold"
    assert record.priority == 10


def test_enterprise_plan_without_dedicated_lane_uses_default(submit: Submit, services: Services) -> None:
    from tests.support.api import KEY_B

    _, record = stored(services, submit(extra={"enterprise_plan": {"enabled": True}}, key=KEY_B))
    assert queued(services)[-1] == (record.task_id, "sd15")
    assert record.priority == 0


def test_task_immediately_queryable(client: TestClient, submit: Submit) -> None:
    task_id = submit().json()["task_id"]
    r = client.get("/v3/async/task-result", params={"task_id": task_id}, headers=auth(KEY_A))
    assert r.status_code == 200
    assert r.json()["task"]["status"] == "TASK_STATUS_QUEUED"
