"""GET /v3/model filters and pagination, and the official Python SDK against a live server."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from novita_client import NovitaClient
from PIL import Image
from tests.support.api import KEY_A, MODEL_COUNT, auth, image_bytes, make_services
from tests.support.ports import free_port
from tests.support.requests import stored_img2img

from underpaint.api.app import create_app
from underpaint.services import Services
from underpaint.storage.local import image_key
from underpaint.tasks.types import ImageRecord


def models(client: TestClient, query: str = "", status: int = 200) -> dict[str, Any]:
    r = client.get("/v3/model" + (f"?{query}" if query else ""), headers=auth())
    assert r.status_code == status, r.text
    data: dict[str, Any] = r.json()
    return data


def names(data: dict[str, Any]) -> list[str]:
    return [m["sd_name"] for m in data["models"]]


def test_unfiltered_lists_everything_once(client: TestClient) -> None:
    data = models(client)
    assert len(data["models"]) == MODEL_COUNT == len(set(names(data)))
    assert data["pagination"] == {"next_cursor": ""}


def test_model_fields(client: TestClient, models_dir: Path) -> None:
    (lora,) = models(client, "filter.types=lora&filter.query=add_detail")["models"]
    sha256 = hashlib.sha256((models_dir / "lora" / "add_detail.safetensors").read_bytes()).hexdigest()
    assert lora == {
        "id": lora["id"],
        "name": "add_detail",
        "sd_name": "add_detail.safetensors",
        "sd_name_in_api": "add_detail",
        "type": {"name": "lora", "display_name": "LoRA"},
        "status": 1,
        "hash_sha256": sha256,
        "categories": [],
        "tags": [],
        "cover_url": "",
        "source": "uploading",
        "base_model": "SD 1.5",
        "base_model_type": "Standard",
        "download_url": "",
        "download_url_ttl": 0,
        "is_sdxl": False,
        "is_nsfw": False,
        "visibility": "public",
    }
    assert isinstance(lora["id"], int)
    assert lora["id"] > 0
    (ckpt,) = models(client, "filter.types=checkpoint&filter.is_sdxl=true")["models"]
    assert ckpt["sd_name_in_api"] == "sd_xl_base_1.0.safetensors"
    assert ckpt["base_model"] == "SDXL 1.0"


@pytest.mark.parametrize(
    "query",
    ["filter.types=lora", "filter.type=lora", "filter%5Btypes%5D=lora", "filter[type]=LoRA", "filter.types=locon"],
)
def test_type_filter_forms(client: TestClient, query: str) -> None:
    assert names(models(client, query)) == ["add_detail.safetensors", "xl_detail.safetensors"]


@pytest.mark.parametrize(
    ("types", "count"),
    [("checkpoint", 3), ("vae", 1), ("textualinversion", 2), ("text_inversion", 2), ("controlnet", 2),
     ("ipadapter", 2), ("upscaler", 2), ("lora,vae", 3), ("upscaler,vae", 3)],
)  # fmt: skip
def test_each_type(client: TestClient, types: str, count: int) -> None:
    data = models(client, f"filter.types={types}")
    assert len(data["models"]) == count
    assert all(m["type"]["name"] in types.replace("text_inversion", "textualinversion") for m in data["models"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("True", True), ("1", True), ("false", False), ("False", False), ("0", False)],
)
def test_is_sdxl_forms(client: TestClient, value: str, expected: bool) -> None:
    data = models(client, f"filter.is_sdxl={value}")
    assert data["models"]
    assert all(m["is_sdxl"] is expected for m in data["models"])
    bracketed = models(client, f"filter[is_sdxl]={value}")
    assert names(bracketed) == names(data)


def test_bad_filter_values(client: TestClient) -> None:
    for query in ["filter.is_sdxl=maybe", "filter.types=sampler", "filter.visibility=everyone",
                  "pagination.limit=0", "pagination.limit=101", "pagination.limit=abc", "pagination.cursor=zzz"]:  # fmt: skip
        data = models(client, query, status=400)
        assert data["reason"] == "INVALID_REQUEST_BODY"
        assert data["code"] == 400
        assert data["metadata"]["field"] in query.replace("[", ".").replace("]", "")


def test_query_filter_case_insensitive(client: TestClient) -> None:
    assert names(models(client, "filter.query=DETAIL")) == ["add_detail.safetensors", "xl_detail.safetensors"]
    assert names(models(client, "filter.query=canny&filter.is_sdxl=False")) == ["control_v11p_sd15_canny.safetensors"]


def test_visibility_and_source(client: TestClient) -> None:
    assert len(models(client, "filter.visibility=public")["models"]) == MODEL_COUNT
    assert models(client, "filter.visibility=private")["models"] == []
    assert len(models(client, "filter.source=uploading")["models"]) == MODEL_COUNT
    assert models(client, "filter.source=civitai")["models"] == []


def test_inpainting(client: TestClient) -> None:
    assert names(models(client, "filter.is_inpainting=true")) == ["sd15-inpainting.safetensors"]
    assert len(models(client, "filter.is_inpainting=False")["models"]) == MODEL_COUNT
    (m,) = models(client, "filter.query=inpainting")["models"]
    assert m["base_model_type"] == "Inpainting"


def test_pagination_walk(client: TestClient) -> None:
    everything = names(models(client))
    seen: list[str] = []
    cursor = ""
    for _ in range(10):
        data = models(client, f"pagination.limit=5&pagination.cursor={cursor}")
        seen += names(data)
        cursor = data["pagination"]["next_cursor"]
        if not cursor:
            break
    assert seen == everything
    assert names(models(client, "pagination.limit=5&pagination.cursor=c_5")) == everything[5:10]
    assert names(models(client, "pagination[limit]=5&pagination[cursor]=c_10")) == everything[10:]
    assert names(models(client, "pagination.limit=5&pagination.cursor=c_c_5")) == everything[5:10]
    assert models(client, "pagination.cursor=c_1000")["models"] == []


def test_hash_is_the_files_sha256(services: Services, models_dir: Path) -> None:
    from fastapi.testclient import TestClient

    data = TestClient(create_app(services)).get("/v3/model?filter.types=vae", headers=auth()).json()
    (model,) = data["models"]
    expected = hashlib.sha256((models_dir / "vae" / "vae-ft-mse-840000.safetensors").read_bytes()).hexdigest()
    assert model["hash_sha256"] == expected


# --- live server + official Python SDK ----------------------------------------------------------------------------


class CompletingQueue:
    """Plays the worker: on enqueue, claims the task, stores one PNG per image and completes it."""

    def __init__(self) -> None:
        self.services: Services | None = None

    def enqueue(self, task_id: str, lane: str) -> None:
        threading.Thread(target=self._run, args=(task_id,), daemon=True).start()

    def _run(self, task_id: str) -> None:
        assert self.services is not None
        services = self.services
        time.sleep(0.2)
        record = services.store.claim(task_id, "w")
        assert record is not None
        request = stored_img2img(services.store, task_id)
        images = []
        for i in range(request.image_num):
            key = image_key(task_id, record.response_image_type)
            fmt = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[record.response_image_type]
            services.storage.put(key, image_bytes((request.width, request.height), fmt=fmt, color=(i, 0, 0)), "x")
            images.append(ImageRecord(key, record.response_image_type))
        services.store.complete(task_id, "w", images)


@pytest.fixture
def live(models_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Services]]:
    queue = CompletingQueue()
    services = make_services(models_dir, tmp_path, queue=queue)
    queue.services = services
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(services), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", services
    finally:
        server.should_exit = True
        thread.join(10)


def test_python_sdk_models_v3_lists_each_model_once(live: tuple[str, Services]) -> None:
    base_url, _ = live
    sdk = NovitaClient(KEY_A, base_url)
    listed = sdk.models_v3()
    sd_names = [m.sd_name for m in listed]
    assert len(sd_names) == MODEL_COUNT == len(set(sd_names))
    res = sdk.query_model_v3(visibility="public", types="lora", is_sdxl=False, query="detail", limit=10, cursor="0")
    assert [m.sd_name for m in res.models] == ["add_detail.safetensors"]
    assert res.models[0].sd_name_in_api == "add_detail"
    assert res.pagination.next_cursor == ""
    res = sdk.query_model_v3(types="checkpoint", limit=2)
    assert len(res.models) == 2
    assert res.pagination.next_cursor == "c_2"
    res = sdk.query_model_v3(types="checkpoint", limit=2, cursor=res.pagination.next_cursor)
    assert len(res.models) == 1
    assert res.pagination.next_cursor == ""


def test_python_sdk_img2img_end_to_end(live: tuple[str, Services]) -> None:
    from novita_client import Img2ImgV3ControlNetUnit, Img2ImgV3Embedding, Img2V3ImgLoRA

    base_url, _services = live
    sdk = NovitaClient(KEY_A, base_url)
    init = Image.new("RGB", (64, 64), (10, 200, 30))
    res = sdk.img2img_v3(
        model_name="dreamshaper_8.safetensors",
        input_image=init,
        prompt="a cat",
        image_num=2,
        width=128,
        height=128,
        loras=[Img2V3ImgLoRA(model_name="add_detail", strength=0.7)],
        embeddings=[Img2ImgV3Embedding(model_name="easynegative")],
        controlnet_units=[
            Img2ImgV3ControlNetUnit(model_name="control_v11p_sd15_canny", image_base64=init, strength=0.8)
        ],
    )
    assert res.task.status.value == "TASK_STATUS_SUCCEED"
    assert int(res.extra.seed) >= 0
    assert res.extra.debug_info.complete_time_ms > 0
    assert len(res.images_encoded) == 2
    for encoded in res.images_encoded:
        im = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert im.format == "JPEG"
        assert im.size == (128, 128)
