"""schemathesis against the API's OpenAPI schema, in process over ASGI: no generated request may get a 5xx.

Bounded for CI: ``UNDERPAINT_SCHEMATHESIS_EXAMPLES`` examples per operation (default 50; positive and negative
cases: bodies that follow the schema and bodies that break it in every way schemathesis knows), each answered by
the real app over the real SQLite store. Every answer is a 2xx/4xx, and every non-200 one has Novita's error shape.

The schema is the service's own ``GET /openapi.json`` (``api/openapi.py``), so every operation it publishes is
exercised: the three Novita routes and the extensions (task-cancel, the recent tasks, the queue), the signed file
route and ``/health``.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.schemas import OpenApiSchema
from tests.support.api import KEY_A, image_bytes

from underpaint.api.app import create_app
from underpaint.services import Services

pytestmark = pytest.mark.parity  # schemathesis, the outside reference, generates every request

OPERATIONS = [
    ("POST", "/v3/async/img2img"),
    ("POST", "/v3/async/upscale"),
    ("POST", "/v3/async/txt2img"),
    ("POST", "/v3/async/inpainting"),
    ("GET", "/v3/async/task-result"),
    ("POST", "/v3/async/task-cancel"),
    ("GET", "/v3/async/tasks"),
    ("GET", "/v3/async/queue"),
    ("GET", "/v3/model"),
    ("POST", "/v3/model/pull"),
    ("GET", "/v3/model/pull/{pull_id}"),
    ("GET", "/v3/files/{key}"),
    ("GET", "/health"),
]
# Negative cases for every operation that takes input (``/health`` takes none: nothing to break).
CASES = [
    (operation, mode)
    for operation in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if not (mode is GenerationMode.NEGATIVE and operation == ("GET", "/health"))
]
EXAMPLES = int(os.environ.get("UNDERPAINT_SCHEMATHESIS_EXAMPLES", "50"))
AUTH = {"Authorization": f"Bearer {KEY_A}"}
VALID_IMAGE = base64.b64encode(image_bytes((32, 32))).decode()
INPAINT_IMAGE = base64.b64encode(image_bytes((64, 64))).decode()
INPAINT_MASK = base64.b64encode(image_bytes((64, 64), mode="L", color=255)).decode()
KNOWN_MODELS = {
    "/v3/async/img2img": ("dreamshaper_8.safetensors", "sd_xl_base_1.0.safetensors"),
    "/v3/async/txt2img": ("dreamshaper_8.safetensors", "sd_xl_base_1.0.safetensors"),
    "/v3/async/inpainting": ("dreamshaper_8.safetensors", "sd15-inpainting.safetensors"),
    "/v3/async/upscale": ("RealESRGAN_x4plus_anime_6B", "4x-UltraSharp"),
}


@pytest.fixture
def app(services: Services) -> FastAPI:
    return create_app(services)


@pytest.fixture
def api_schema(app: FastAPI) -> OpenApiSchema:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _reach_deeper(case: Any, models: tuple[str, str]) -> None:
    """Random base64 is never an image and random names are never models, so every generated submit would stop at
    the first check. For two thirds of the cases (chosen from the case itself, so a failure replays), put a real
    image and model in, so that what the schema generated for the other fields reaches task creation."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("request"), dict):
        return
    request = body["request"]
    if len(repr(request)) % 3 == 0:
        return
    if case.operation.path != "/v3/async/txt2img":  # the endpoints that take an image
        request["image_base64"] = VALID_IMAGE
    if case.operation.path == "/v3/async/inpainting":
        request["image_base64"] = INPAINT_IMAGE
        request["mask_image_base64"] = INPAINT_MASK
    request["model_name"] = models[len(request) % 2]


def _answer_is_novita(case: Any) -> None:
    if case.operation.path in KNOWN_MODELS:
        _reach_deeper(case, KNOWN_MODELS[case.operation.path])
    response = case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
    if response.status_code != 200:
        body = response.json()
        assert set(body) == {"code", "reason", "message", "metadata"}, body
        assert body["code"] == response.status_code, body
        assert response.status_code in (400, 403, 404, 405, 409, 429), body


# schemathesis' own pytest plugin (``schemathesis.pytest.from_fixture``) does not run under pytest 9 (it reads a
# removed ``Function._nodeid``), so each operation's strategy drives a plain hypothesis test here.
@pytest.mark.parametrize(("operation", "mode"), CASES, ids=[f"{m} {p} {mode}" for (m, p), mode in CASES])
def test_no_server_errors(api_schema: OpenApiSchema, operation: tuple[str, str], mode: GenerationMode) -> None:
    method, path = operation
    generated = api_schema[path][method]

    @given(generated.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        _answer_is_novita(case)

    run()


def test_every_published_operation_is_fuzzed(api_schema: OpenApiSchema) -> None:
    published = sorted((method.upper(), path) for path, ops in api_schema.raw_schema["paths"].items() for method in ops)
    assert published == sorted(OPERATIONS)
