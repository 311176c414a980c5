"""A live ``underpaint serve`` answers hostile JSON bodies with a Novita 400, never a 5xx, and stays up.

The server runs without a worker (``UNDERPAINT_RUN_WORKER=0``): accepted tasks only queue, so the few valid
bodies here cost no generation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.server import LiveServer

from underpaint.api.submit import MAX_BODY_BYTES, MAX_JSON_CONTAINERS, MAX_JSON_DEPTH, MAX_JSON_VALUES

AUTH = {"Authorization": "Bearer key-a", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(
        tmp_path_factory.mktemp("hostile") / "data", tiny_models_dir, extra_env={"UNDERPAINT_RUN_WORKER": "0"}
    )
    live.start()
    try:
        yield live
    finally:
        live.stop()


def _request(png_b64: str, **fields: Any) -> dict[str, Any]:
    return {
        "model_name": "tiny-sd15.safetensors",
        "image_base64": png_b64,
        "prompt": "a castle",
        "steps": 2,
        **fields,
    }


def _post(server: LiveServer, raw: bytes) -> httpx.Response:
    return httpx.post(server.url + "/v3/async/img2img", content=raw, headers=AUTH, timeout=120)


def _assert_invalid_body(r: httpx.Response, words: str) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["reason"] == "INVALID_REQUEST_BODY", body
    assert body["code"] == 400
    assert words in body["message"], body["message"]


def _nested(depth: int, inner: str = "1", kind: str = "object") -> str:
    if kind == "object":
        return '{"a":' * depth + inner + "}" * depth
    return "[" * depth + inner + "]" * depth


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        pytest.param(_nested(100_000).encode(), "levels deep", id="100k-nested-objects"),
        pytest.param(('{"request":' + _nested(200_000, "", "array") + "}").encode(), "levels deep", id="200k-arrays"),
        pytest.param(_nested(MAX_JSON_DEPTH + 1, "0", "array").encode(), "levels deep", id="one-level-too-deep"),
        pytest.param(
            ('{"request":' + _nested(100_000, "", "array") + "}").encode("utf-16"), "levels deep", id="utf-16-deep"
        ),
        pytest.param(("[" + "{}," * (MAX_JSON_CONTAINERS + 1) + "{}]").encode(), "objects and arrays", id="wide"),
        pytest.param(("[" + "0," * (MAX_JSON_VALUES + 1) + "0]").encode(), "JSON values", id="many-values"),
        pytest.param(b"]" * 100_000, "not valid JSON", id="unbalanced"),
        pytest.param(('{"request": {"seed": 1' + "0" * 5000 + "}}").encode(), "not valid JSON", id="huge-integer"),
        pytest.param(b'{"request": "\xff\xfe\xfd"}', "not valid JSON", id="not-utf8"),
    ],
)
def test_hostile_json_gets_400(server: LiveServer, raw: bytes, words: str) -> None:
    _assert_invalid_body(_post(server, raw), words)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_deep_nesting_inside_request_fields_gets_400(server: LiveServer, png_b64: str) -> None:
    deep = json.loads(_nested(MAX_JSON_DEPTH, "0", "array"))
    for field in ("prompt", "extra", "loras", "unknown_field"):
        raw = json.dumps({"request": _request(png_b64, **{field: deep})}).encode()
        _assert_invalid_body(_post(server, raw), "levels deep")


def test_reasonable_nesting_and_brackets_in_strings_are_accepted(server: LiveServer, png_b64: str) -> None:
    """The limits are far from real bodies: ignored keys may nest a few levels, and brackets or commas inside
    strings (A1111 prompt syntax) do not count."""
    ignored = json.loads(_nested(MAX_JSON_DEPTH - 4))
    prompt = "[" * 500 + "a castle, " * 40
    raw = json.dumps({"extra": {}, "request": _request(png_b64, prompt=prompt[:1024], extra=ignored)}).encode()
    r = _post(server, raw)
    assert r.status_code == 200, r.text
    assert r.json()["task_id"]


@pytest.mark.parametrize(
    ("model", "clip_skip", "status"),
    [
        ("tiny-sd15.safetensors", 6, 400),  # its text encoder has 5 layers
        ("tiny-sd15-diffusers", 6, 400),
        ("tiny-sd15.safetensors", 5, 200),
        ("tiny-sdxl.safetensors", 12, 200),  # SDXL ignores clip_skip, as A1111 does by default
    ],
)
def test_clip_skip_is_checked_against_the_checkpoint_at_submit(
    server: LiveServer, png_b64: str, model: str, clip_skip: int, status: int
) -> None:
    raw = json.dumps({"request": _request(png_b64, model_name=model, clip_skip=clip_skip)}).encode()
    r = _post(server, raw)
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["metadata"] == {"field": "request.clip_skip", "text_encoder_layers": 5}


def test_body_over_the_limit_is_400_while_streaming(server: LiveServer) -> None:
    """Past ``MAX_BODY_BYTES`` the server stops reading and answers 400 (Novita documents no 413), here for a
    chunked body, which has no Content-Length to refuse up front."""
    chunk = b"[" + b"0," * (1024 * 1024)

    def chunks() -> Iterator[bytes]:
        sent = 0
        while sent <= MAX_BODY_BYTES:
            yield chunk
            sent += len(chunk)

    r = httpx.post(server.url + "/v3/async/img2img", content=chunks(), headers=AUTH, timeout=120)
    _assert_invalid_body(r, "request body exceeds 100 MB")
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
