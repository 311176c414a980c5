"""Checks at submit that depend on the body's shape or on the chosen checkpoint: JSON depth/size, clip_skip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save_file
from tests.support.api import KEY_A, auth, b64, body, image_bytes, make_services, task_count

from underpaint.api.app import create_app
from underpaint.api.submit import MAX_JSON_CONTAINERS, MAX_JSON_DEPTH, MAX_JSON_VALUES, parse_json
from underpaint.tasks.store import SqlTaskStore
from underpaint.wire.errors import ApiError

# ---------------------------------------------------------------------------------------------------------------
# JSON shape (the live-server version of these is tests/e2e/test_hostile_bodies.py)


def _reason(raw: bytes) -> str:
    with pytest.raises(ApiError) as info:
        parse_json(raw)
    assert info.value.status == 400
    assert info.value.reason == "INVALID_REQUEST_BODY"
    return str(info.value.message)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1_000, 300_000])
@pytest.mark.parametrize(("opener", "closer"), [("[", "]"), ('{"k":', "}")])
def test_too_deep_is_refused_before_parsing(depth: int, opener: str, closer: str) -> None:
    assert "levels deep" in _reason((opener * depth + "1" + closer * depth).encode())


def test_limits_are_exact() -> None:
    assert parse_json(("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH).encode()) is not None
    assert "levels deep" in _reason(("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)).encode())
    assert len(parse_json(("[" + "[]," * (MAX_JSON_CONTAINERS - 2) + "[]]").encode())) == MAX_JSON_CONTAINERS - 1
    assert "objects and arrays" in _reason(("[" + "[]," * MAX_JSON_CONTAINERS + "[]]").encode())
    assert len(parse_json(("[" + "0," * MAX_JSON_VALUES + "0]").encode())) == MAX_JSON_VALUES + 1
    assert "JSON values" in _reason(("[" + "0," * (MAX_JSON_VALUES + 1) + "0]").encode())


def test_brackets_and_quotes_inside_strings_do_not_count() -> None:
    text = json.dumps({"p": "[{" * 50_000 + '\\"],' * 100, "q": ["]" * 10, "x\\"]})
    assert parse_json(text.encode()) == json.loads(text)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32", "utf-16-be"])
def test_other_unicode_encodings_are_scanned_too(encoding: str) -> None:
    assert parse_json('{"a": ["é", 1]}'.encode(encoding)) == {"a": ["é", 1]}
    assert "levels deep" in _reason(("[" * 50_000 + "]" * 50_000).encode(encoding))


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe\x00", b'{"a": "\xc3"}', b"[" * 10 + b'"unterminated', b"1" * 5000, b"NaN-ish", b"{" * 20],
)
def test_not_json_is_400(raw: bytes) -> None:
    assert "not valid JSON" in _reason(raw)


def test_deep_body_through_the_app(client: TestClient, services: Any, png_b64: str) -> None:
    request = body(png_b64)["request"]
    request["loras"] = "DEEP"
    raw = json.dumps({"request": request}).replace('"DEEP"', "[" * 100_000 + "]" * 100_000)
    r = client.post("/v3/async/img2img", content=raw, headers=auth(KEY_A))
    assert r.status_code == 400, r.text
    assert r.json()["reason"] == "INVALID_REQUEST_BODY"
    assert task_count(services) == 0


# ---------------------------------------------------------------------------------------------------------------
# clip_skip against the checkpoint's text encoder


def _te_checkpoint(path: Path, layers: int, sdxl: bool = False) -> None:
    keys = ["conditioner.embedders.1.model.x"] if sdxl else ["model.diffusion_model.input_blocks.0.0.weight"]
    prefix = "conditioner.embedders.0.transformer" if sdxl else "cond_stage_model.transformer"
    keys += [f"{prefix}.text_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(layers)]
    save_file({k: np.zeros(1, dtype=np.float32) for k in keys}, str(path))


@pytest.fixture
def clip_client(models_dir: Path, tmp_path: Path) -> Any:
    models = tmp_path / "models"
    shutil.copytree(models_dir, models)
    _te_checkpoint(models / "checkpoint" / "pruned_te6.safetensors", 6)
    _te_checkpoint(models / "checkpoint" / "full_te12.safetensors", 12)
    _te_checkpoint(models / "checkpoint" / "xl_te4.safetensors", 4, sdxl=True)
    (tmp_path / "data").mkdir()
    services = make_services(models, tmp_path / "data")
    store = services.store
    assert isinstance(store, SqlTaskStore)
    try:
        with TestClient(create_app(services), raise_server_exceptions=False) as client:
            yield client, services
    finally:
        store.close()


def _post_clip(clip_client: Any, model: str, clip_skip: int) -> Any:
    client, _ = clip_client
    payload = body(b64(image_bytes()), model_name=model, clip_skip=clip_skip)
    return client.post("/v3/async/img2img", json=payload, headers=auth(KEY_A))


@pytest.mark.parametrize("clip_skip", [7, 12])
def test_clip_skip_beyond_the_text_encoder_is_400_at_submit(clip_client: Any, clip_skip: int) -> None:
    r = _post_clip(clip_client, "pruned_te6.safetensors", clip_skip)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["reason"] == "INVALID_REQUEST_BODY"
    assert err["metadata"] == {"field": "request.clip_skip", "text_encoder_layers": 6}
    assert "6 layers" in err["message"]
    assert "pruned_te6.safetensors" in err["message"]
    assert task_count(clip_client[1]) == 0


@pytest.mark.parametrize(
    ("model", "clip_skip"),
    [
        ("pruned_te6.safetensors", 6),
        ("full_te12.safetensors", 12),
        ("xl_te4.safetensors", 12),  # SDXL ignores clip_skip (A1111's default), whatever its encoder depth
        ("dreamshaper_8.safetensors", 12),  # depth unknown (no text encoder keys): the schema's 1-12 applies
    ],
)
def test_clip_skip_within_the_text_encoder_is_accepted(clip_client: Any, model: str, clip_skip: int) -> None:
    r = _post_clip(clip_client, model, clip_skip)
    assert r.status_code == 200, r.text
