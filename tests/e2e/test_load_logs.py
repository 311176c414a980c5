"""What an operator reads when a task loads models: one INFO line per model load, whatever the kind (name, seconds,
tier), and none when the next task finds them loaded.

One img2img task through HTTP and the worker with every adapter (LoRA, embedding, sd_vae, a ControlNet unit with a
network preprocessor, an IP-Adapter and its image encoder) on the tiny demo models. (The NSFW detector's line:
``tests/safety/test_nsfw.py``.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.adapter_task import HEADERS, Service, adapter_request, service
from tests.support.logs import assert_load_lines


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Service]:
    yield from service(tmp_path_factory.mktemp("data"), tiny_models_dir, "float32")


def _run(svc: Service) -> None:
    request = adapter_request("sd15", size=128)
    request.update(image_num=1, steps=2)
    request["controlnet"]["units"][0]["preprocessor"] = "softedge_hed"  # a network annotator (canny has none)
    body = {"extra": {}, "request": request}
    r = svc.client.post("/v3/async/img2img", json=body, headers=HEADERS)
    assert r.status_code == 200, r.text
    assert svc.worker.run_once()
    result = svc.client.get("/v3/async/task-result", params={"task_id": r.json()["task_id"]}, headers=HEADERS)
    assert result.json()["task"]["status"] == "TASK_STATUS_SUCCEED", result.json()["task"]


def test_every_model_a_task_loads_gets_one_info_line(svc: Service, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="underpaint"):
        _run(svc)
    expected = {
        "checkpoint": ["tiny-sd15.safetensors"],
        "LoRA": ["tiny-detail-sd15.safetensors"],
        "embedding": ["tiny-subject-sd15.pt"],
        "VAE": ["tiny-vae.safetensors"],
        "ControlNet": ["control_v11p_sd15_canny.safetensors"],
        "annotator": ["hed:ControlNetHED.pth"],
        "IP-Adapter": ["ip-adapter_sd15.bin"],
        "image encoder": ["sd15"],
    }
    for kind, names in expected.items():
        assert_load_lines(caplog, kind, names, tiers=["disk"] * len(names))
    kinds = {getattr(r, "model_kind", None) for r in caplog.records} - {None}
    assert kinds == set(expected)  # no load without its line, no line of a kind this test does not know

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="underpaint"):
        _run(svc)  # everything is loaded now
    assert [r.getMessage() for r in caplog.records if hasattr(r, "model_kind")] == []
