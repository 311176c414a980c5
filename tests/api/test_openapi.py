"""``/openapi.json`` is a valid OpenAPI 3.1 document that says what the routes really accept and return.

* it passes ``openapi-spec-validator``;
* a request built from the published schema alone (plus real model names) is accepted, and one just outside a
  published bound is refused with the documented 400;
* real task-result, model, error and extension answers validate against the published response schemas
  (``jsonschema``, Draft 2020-12, the dialect of OpenAPI 3.1);
* the documented paths are exactly the API routes the app serves.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import validate
from tests.support.api import KEY_B, auth, image_bytes
from tests.support.requests import stored_img2img

from underpaint.api.openapi import CANCEL_PATH, RESULT_PATH, SUBMIT_PATH, TXT2IMG_PATH, build_openapi
from underpaint.services import Services
from underpaint.tasks.contract import Txt2ImgRequest
from underpaint.tasks.types import ImageRecord, NsfwResult

SUBMIT = SUBMIT_PATH
RESULT = RESULT_PATH


@pytest.fixture
def doc(client: TestClient) -> dict[str, Any]:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return dict(r.json())


def validator(doc: dict[str, Any], name: str) -> Draft202012Validator:
    """A validator for ``components.schemas[name]`` whose ``#/components/...`` references resolve in ``doc``."""
    root = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return Draft202012Validator(root, format_checker=FormatChecker())


def check(doc: dict[str, Any], name: str, instance: Any) -> None:
    errors = sorted(validator(doc, name).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def example(doc: dict[str, Any], schema: dict[str, Any], image: str) -> Any:
    """An instance of ``schema`` from its keywords alone: every property (optional ones too), the default or
    the lowest allowed value, the first non-null enum member, one item per array, ``image`` for base64."""
    schema = resolve(doc, schema)
    if "enum" in schema:
        return next(v for v in schema["enum"] if v is not None)
    if "anyOf" in schema:
        return example(doc, next(s for s in schema["anyOf"] if s.get("type") != "null"), image)
    kind = schema.get("type")
    if kind == "object":
        return {name: example(doc, prop, image) for name, prop in schema.get("properties", {}).items()}
    if kind == "array":
        return [example(doc, schema["items"], image)] if schema.get("maxItems", 1) > 0 else []
    if "default" in schema:
        return schema["default"]
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return False
    if schema.get("contentEncoding") == "base64":
        return image
    if schema.get("format") == "uri":
        return "https://example.com/hook"
    return "x" * max(1, schema.get("minLength", 1))


def operation_statuses(doc: dict[str, Any], path: str, method: str) -> set[int]:
    return {int(s) for s in doc["paths"][path][method]["responses"]}


def test_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <API key>",
    }
    assert doc["security"] == [{"bearer": []}]
    for name in ("Img2ImgBody", "TaskResultResponse", "ModelListResponse", "ErrorBody", "TaskListResponse"):
        assert name in doc["components"]["schemas"]


def test_steering_extensions_are_documented_once_served() -> None:
    """Cancel and Idempotency-Key come with the task-cancel route; the document stays valid with them."""
    without = build_openapi({SUBMIT, RESULT})
    assert CANCEL_PATH not in without["paths"]
    assert without["paths"][SUBMIT]["post"]["parameters"] == []
    assert "409" not in without["paths"][SUBMIT]["post"]["responses"]
    served = build_openapi({SUBMIT, RESULT, CANCEL_PATH})
    validate(served)
    (header,) = served["paths"][SUBMIT]["post"]["parameters"]
    assert (header["name"], header["in"], header["required"]) == ("Idempotency-Key", "header", False)
    assert "IDEMPOTENCY_KEY_REUSED" in served["paths"][SUBMIT]["post"]["responses"]["409"]["description"]
    cancel = served["paths"][CANCEL_PATH]["post"]
    assert cancel["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CancelRequest"
    }
    assert "TASK_NOT_CANCELLABLE" in cancel["responses"]["400"]["description"]


def test_documented_paths_are_the_served_api_routes(client: TestClient, doc: dict[str, Any]) -> None:
    api_routes = {
        path.replace("{key:path}", "{key}")
        for route in client.app.routes  # type: ignore[attr-defined]
        if (path := getattr(route, "path", "")).startswith("/v3/") or path == "/health"
    }
    assert set(doc["paths"]) == api_routes
    # and none of them answers the unknown-route 404
    for path, item in doc["paths"].items():
        for method in item:
            r = client.request(method.upper(), path.replace("{key}", "k"), headers=auth())
            assert r.json().get("reason") != "API_NOT_FOUND", (method, path)


def with_this_servers_models(body: dict[str, Any]) -> None:
    """What a schema cannot know: the names of this server's models, and outside services (webhook, S3)."""
    request = body["request"]
    request["model_name"] = "dreamshaper_8.safetensors"
    request["sd_vae"] = "vae-ft-mse-840000.safetensors"
    request["loras"][0]["model_name"] = "add_detail.safetensors"
    request["embeddings"][0]["model_name"] = "easynegative.safetensors"
    request["controlnet"]["units"][0]["model_name"] = "control_v11p_sd15_canny.safetensors"
    request["ip_adapters"][0]["model_name"] = "ip-adapter_sd15.bin"
    for outside in ("webhook", "custom_storage"):
        body["extra"].pop(outside)


def test_request_built_from_the_schema_is_accepted(
    client: TestClient, doc: dict[str, Any], services: Services, png_b64: str
) -> None:
    media = doc["paths"][SUBMIT]["post"]["requestBody"]["content"]["application/json"]
    body = example(doc, media["schema"], png_b64)
    with_this_servers_models(body)
    check(doc, "Img2ImgBody", body)

    r = client.post(SUBMIT, json=body, headers=auth())
    assert r.status_code == 200, r.text
    check(doc, "SubmitResponse", r.json())
    request = stored_img2img(services.store, r.json()["task_id"])
    assert request.controlnet is not None
    assert request.controlnet.units[0].guidance_end == 1.0  # the schema's default reached the task
    assert request.width == 512


def test_txt2img_request_built_from_the_schema_is_accepted(
    client: TestClient, doc: dict[str, Any], services: Services, png_b64: str
) -> None:
    operation = doc["paths"][TXT2IMG_PATH]["post"]
    assert "hires_fix" in operation["description"]
    body = example(doc, operation["requestBody"]["content"]["application/json"]["schema"], png_b64)
    request = body["request"]
    assert "image_base64" not in request
    assert "task_type" not in request  # the route decides it; not a wire field
    assert "_base_url" not in body["extra"]
    with_this_servers_models(body)
    # Nor can it know that the first pass's size bounds the hires target, or that this server has no refiner.
    request["hires_fix"] |= {"target_width": 1024, "target_height": 1024}
    request.pop("refiner")
    check(doc, "Txt2ImgBody", body)
    r = client.post(TXT2IMG_PATH, json=body, headers=auth())
    assert r.status_code == 200, r.text
    check(doc, "SubmitResponse", r.json())
    stored = services.store.get_request(r.json()["task_id"])
    assert isinstance(stored, Txt2ImgRequest)
    assert stored.width == 512
    bounds = resolve(doc, doc["components"]["schemas"]["HiresFixIn"])["properties"]["target_width"]
    assert (bounds["minimum"], bounds["maximum"]) == (128, 4096)


def _bounded_fields(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    request = resolve(doc, doc["components"]["schemas"]["Img2ImgRequest"])
    return [(name, prop) for name, prop in request["properties"].items() if "maximum" in prop]


def test_published_bounds_are_the_validator_bounds(
    client: TestClient, doc: dict[str, Any], png_b64: str, submit: Any
) -> None:
    bounded = _bounded_fields(doc)
    assert {name for name, _ in bounded} >= {"width", "height", "steps", "image_num", "guidance_scale", "seed"}
    for name, prop in bounded:
        step = 1 if prop["type"] == "integer" else 0.5
        for value in (prop["minimum"] - step, prop["maximum"] + step):
            r = submit(**{name: value})
            assert r.status_code == 400, (name, value)
            assert r.json()["reason"] in ("INVALID_REQUEST_BODY", "INVALID_IMAGE_SIZE")
            assert r.json()["metadata"]["field"] == f"request.{name}"
            check(doc, "ErrorBody", r.json())
        assert 400 in operation_statuses(doc, SUBMIT, "post")
    # the largest documented values are accepted (an 8-image 2048x2048 task is only queued here)
    r = submit(width=2048, height=2048, image_num=8, steps=100, guidance_scale=30, seed=2**32 - 1)
    assert r.status_code == 200, r.text
    unknown = submit(sampler_name="Euler z")
    assert unknown.status_code == 400
    sampler_enum = resolve(doc, doc["components"]["schemas"]["Img2ImgRequest"])["properties"]["sampler_name"]["enum"]
    for name in sampler_enum:
        assert submit(sampler_name=name).status_code == 200, name


def test_task_results_validate_against_the_response_schema(
    client: TestClient, doc: dict[str, Any], services: Services, submit: Any
) -> None:
    ids = [submit(image_num=2).json()["task_id"] for _ in range(3)]

    def result(task_id: str) -> Any:
        r = client.get(RESULT, params={"task_id": task_id}, headers=auth())
        assert r.status_code == 200
        return r.json()

    queued = result(ids[0])
    assert queued["task"]["status"] == "TASK_STATUS_QUEUED"
    check(doc, "TaskResultResponse", queued)

    store = services.store
    assert store.claim(ids[0], "w") is not None
    store.update_progress(ids[0], "w", 40, 3)
    running = result(ids[0])
    assert (running["task"]["status"], running["task"]["progress_percent"]) == ("TASK_STATUS_PROCESSING", 40)
    check(doc, "TaskResultResponse", running)

    services.storage.put(f"{ids[0]}/0.png", image_bytes(), "image/png")
    services.storage.put(f"{ids[0]}/1.png", image_bytes(), "image/png")
    images = [
        ImageRecord(key=f"{ids[0]}/0.png", image_type="png", nsfw=NsfwResult(valid=True, confidence=12.5)),
        ImageRecord(key=f"{ids[0]}/1.png", image_type="png"),
    ]
    assert store.complete(ids[0], "w", images)
    done = result(ids[0])
    assert len(done["images"]) == 2
    check(doc, "TaskResultResponse", done)

    assert store.fail(ids[1], None, "the model broke")
    failed = result(ids[1])
    assert failed["task"]["reason"] == "the model broke"
    check(doc, "TaskResultResponse", failed)

    # Drift is caught: a field the schema does not know, or one it requires going missing, fails validation.
    extra_field = copy.deepcopy(done)
    extra_field["task"]["surprise"] = 1
    assert not validator(doc, "TaskResultResponse").is_valid(extra_field)
    missing = copy.deepcopy(done)
    del missing["extra"]["debug_info"]
    assert not validator(doc, "TaskResultResponse").is_valid(missing)


def test_errors_validate_and_are_documented(client: TestClient, doc: dict[str, Any]) -> None:
    cases = [
        (client.get(RESULT, params={"task_id": "nope"}, headers=auth()), RESULT, "get", "TASK_NOT_FOUND"),
        (client.get(RESULT, params={"task_id": "x"}, headers=auth("wrong")), RESULT, "get", "INVALID_API_KEY"),
        (client.get(RESULT, params={"task_id": "x"}), RESULT, "get", "MISSING_API_KEY"),
        (client.post(SUBMIT, content=b"{", headers=auth()), SUBMIT, "post", "INVALID_REQUEST_BODY"),
        (client.get("/v3/model?pagination.limit=0", headers=auth()), "/v3/model", "get", "INVALID_REQUEST_BODY"),
        (client.get("/v3/async/tasks?limit=0", headers=auth()), "/v3/async/tasks", "get", "INVALID_REQUEST_BODY"),
    ]
    for r, path, method, reason in cases:
        assert r.json()["reason"] == reason
        check(doc, "ErrorBody", r.json())
        assert r.status_code in operation_statuses(doc, path, method), (path, r.status_code)
        documented = doc["paths"][path][method]["responses"][str(r.status_code)]
        documented = resolve(doc, documented)
        assert reason in documented["description"], (path, reason)


def test_model_and_extension_answers_validate(client: TestClient, doc: dict[str, Any], submit: Any) -> None:
    models = client.get("/v3/model", headers=auth())
    assert models.status_code == 200
    assert models.json()["models"]
    check(doc, "ModelListResponse", models.json())
    submit()
    tasks = client.get("/v3/async/tasks", headers=auth())
    assert len(tasks.json()["tasks"]) == 1
    check(doc, "TaskListResponse", tasks.json())
    queue = client.get("/v3/async/queue", headers=auth(KEY_B))
    assert queue.json()["queue"]["queued"] == 1
    assert queue.json()["mine"]["queued"] == 0
    check(doc, "QueueStatusResponse", queue.json())
    check(doc, "HealthResponse", client.get("/health").json())


def test_unknown_routes_keep_the_novita_404(client: TestClient) -> None:
    for path in ("/nope", "/docs/x", "/playground/../secret", "/playground/playground.html", "/openapi.yaml"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.json() == {
            "code": 404,
            "reason": "API_NOT_FOUND",
            "message": f"no API at GET {r.request.url.path}",
            "metadata": {},
        }
