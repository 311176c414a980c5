"""Fixtures for API tests: a models folder of tiny placeholder files, in-memory store, in-process app."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from tests.support.queues import ListQueue

from underpaint.config import KeyPolicy, Settings
from underpaint.delivery.model_pulls import ModelPulls
from underpaint.registry import ModelRegistry
from underpaint.services import Admission, HealthCheck, Services, WebhookOutbox
from underpaint.storage.local import LocalStorage
from underpaint.storage.urls import ImageUrls, Presigner
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import TaskQueue, TaskRecord

KEY_A = "key-a-0123456789"
KEY_B = "key-b-9876543210"
SECRET = b"test-url-secret"

# kind/file name -> tensor keys that make the registry see SD 1.5 or SDXL
MODEL_FILES: dict[str, list[str]] = {
    "checkpoint/dreamshaper_8.safetensors": ["model.diffusion_model.input_blocks.0.0.weight"],
    "checkpoint/sd_xl_base_1.0.safetensors": ["conditioner.embedders.1.model.x"],
    "checkpoint/sd15-inpainting.safetensors": ["model.diffusion_model.input_blocks.0.0.weight"],
    "lora/add_detail.safetensors": ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"],
    "lora/xl_detail.safetensors": ["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"],
    "vae/vae-ft-mse-840000.safetensors": ["encoder.conv_in.weight"],
    "textualinversion/easynegative.safetensors": ["emb_params"],
    "textualinversion/unaestheticXL.safetensors": ["clip_g", "clip_l"],
    "controlnet/control_v11p_sd15_canny.safetensors": ["input_hint_block.0.weight"],
    "controlnet/controlnet-canny-sdxl-1.0.safetensors": ["add_embedding.linear_1.weight"],
    "upscaler/RealESRGAN_x4plus_anime_6B.safetensors": ["conv_first.weight", "body.0.rdb1.conv1.weight"],
    "upscaler/4x-UltraSharp.safetensors": ["model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"],
}
# tensors whose shape matters: the UNet's conv_in tells an inpainting checkpoint (9 channels) from the others
MODEL_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "checkpoint/dreamshaper_8.safetensors": {"model.diffusion_model.input_blocks.0.0.weight": (1, 4, 1, 1)},
    "checkpoint/sd15-inpainting.safetensors": {"model.diffusion_model.input_blocks.0.0.weight": (1, 9, 1, 1)},
}
OTHER_FILES = ["ipadapter/ip-adapter_sd15.bin", "ipadapter/ip-adapter_sdxl.bin"]
MODEL_COUNT = len(MODEL_FILES) + len(OTHER_FILES)


class Submit(Protocol):
    """The ``submit`` fixture: POST an img2img request (request fields as kwargs, ``extra=`` for the extra object)."""

    def __call__(
        self, extra: Any = ..., key: str = KEY_A, image: str | None = None, **request: Any
    ) -> httpx.Response: ...


def write_models(root: Path) -> Path:
    for rel, keys in MODEL_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        shapes = MODEL_SHAPES.get(rel, {})
        save_file({k: np.zeros(shapes.get(k, (1,)), dtype=np.float32) for k in keys}, str(path))
    for rel in OTHER_FILES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0")
    return root


def image_bytes(
    size: tuple[int, int] = (64, 64), mode: str = "RGB", fmt: str = "PNG", color: Any = None, **save: Any
) -> bytes:
    if color is None:
        color = {"RGB": (200, 30, 60), "RGBA": (200, 30, 60, 255), "L": 128}.get(mode, 0)
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_services(
    models_dir: Path,
    tmp_path: Path,
    *,
    queue: TaskQueue | None = None,
    webhooks: WebhookOutbox | None = None,
    rate_limiter: Admission | None = None,
    health: HealthCheck | None = None,
    presigners: Mapping[str, Presigner] | None = None,
    **settings: Any,
) -> Services:
    """Services over the real SQLite task store and local image storage."""
    base = Settings(
        data_dir=tmp_path,
        models_dir=models_dir,
        api_keys=(KEY_A, KEY_B),
        key_policies={KEY_A: KeyPolicy(dedicated_lane="gold")},
    )
    final = base.with_overrides(**settings) if settings else base
    storage = LocalStorage(tmp_path / "images", SECRET)
    store = SqlTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}")
    return Services(
        settings=final,
        store=store,
        queue=queue if queue is not None else ListQueue(),
        registry=ModelRegistry(models_dir),
        storage=storage,
        image_urls=ImageUrls(storage, final.image_url_ttl, presigners),
        webhooks=webhooks,
        rate_limiter=rate_limiter,
        health=health,
        model_pulls=ModelPulls.from_settings(store.engine, final),
    )


def record_of(services: Services, task_id: str) -> TaskRecord:
    """The stored task (it must exist)."""
    record = services.store.get(task_id)
    assert record is not None, f"task {task_id} is not stored"
    return record


def local_storage(services: Services) -> LocalStorage:
    """The services' image storage, which these tests build as ``LocalStorage`` (it signs file URLs)."""
    assert isinstance(services.storage, LocalStorage), services.storage
    return services.storage


def queued(services: Services) -> list[tuple[str, str]]:
    """(task_id, lane) pairs enqueued so far on the services' in-memory queue."""
    assert isinstance(services.queue, ListQueue), services.queue
    return services.queue.items


def task_count(services: Services) -> int:
    return sum(services.store.count_by_status().values())


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def body(image_b64: str, **request: Any) -> dict[str, Any]:
    req: dict[str, Any] = {"model_name": "dreamshaper_8.safetensors", "image_base64": image_b64, "prompt": "a cat"}
    req.update(request)
    return {"request": req}
