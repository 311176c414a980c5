"""End to end through the real API: test-mode submits, a loopback receiver gets the event, polling agrees."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.numpy import save_file
from tests.support.queues import ListQueue
from tests.support.webhook_receiver import Receiver, signature_ok, wait_for

from underpaint.api.app import create_app
from underpaint.config import Settings
from underpaint.delivery.signing import derive_secret
from underpaint.delivery.webhooks import DELIVERED, WebhookDispatcher
from underpaint.registry import ModelRegistry
from underpaint.services import Services
from underpaint.storage.local import LocalStorage
from underpaint.storage.urls import ImageUrls
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import owner_of

KEY = "key-webhooks-0123456789"
SERVER_SECRET = b"e2e-server-secret"


@pytest.fixture
def app_and_services(tmp_path: Path) -> Iterator[tuple[TestClient, Services, ListQueue, WebhookDispatcher]]:
    checkpoint = tmp_path / "models" / "checkpoint" / "tiny_sd15.safetensors"
    checkpoint.parent.mkdir(parents=True)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros(1, dtype=np.float32)}, str(checkpoint))
    settings = Settings(
        data_dir=tmp_path,
        models_dir=tmp_path / "models",
        api_keys=(KEY,),
        webhook_allow_hosts=("127.0.0.1",),
        webhook_timeout=0.5,
    )
    url = f"sqlite:///{tmp_path / 'underpaint.db'}"
    store = SqlTaskStore(url)
    storage = LocalStorage(tmp_path / "images", SERVER_SECRET)
    queue = ListQueue()
    webhooks = WebhookDispatcher(
        url, settings, lambda owner: derive_secret(SERVER_SECRET, owner), store=store, storage=storage,
        poll_interval=0.05,
    )  # fmt: skip
    services = Services(
        settings, store, queue, ModelRegistry(settings.models_dir), storage,
        ImageUrls(storage, settings.image_url_ttl), webhooks=webhooks,
    )  # fmt: skip
    webhooks.start()
    with TestClient(create_app(services), raise_server_exceptions=False) as client:
        yield client, services, queue, webhooks
    webhooks.close()
    store.close()


def _submit(client: TestClient, extra: dict[str, object]) -> dict[str, object]:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, "PNG")
    request = {"model_name": "tiny_sd15.safetensors", "image_base64": base64.b64encode(buf.getvalue()).decode(),
               "prompt": "a cat"}  # fmt: skip
    response = client.post("/v3/async/img2img", json={"extra": extra, "request": request},
                           headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    body: dict[str, object] = response.json()
    body["_status"] = response.status_code
    return body


@pytest.mark.parametrize("status", ["TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED"])
def test_test_mode_event_equals_the_polled_task_result(
    app_and_services: tuple[TestClient, Services, ListQueue, WebhookDispatcher], receiver: Receiver, status: str
) -> None:
    client, _services, queue, webhooks = app_and_services
    webhook = {"url": receiver.url, "test_mode": {"enabled": True, "return_task_status": status}}
    submitted = _submit(client, {"webhook": webhook})
    assert submitted["_status"] == 200, submitted
    task_id = str(submitted["task_id"])
    assert queue.items == []  # test mode runs no generation
    assert wait_for(lambda: webhooks.deliveries(task_id)[0].status == DELIVERED)
    got = receiver.requests[0]
    assert signature_ok(got.body, got.headers, derive_secret(SERVER_SECRET, owner_of(KEY)))
    event = json.loads(got.body)
    assert event["event_type"] == "ASYNC_TASK_RESULT"
    polled = client.get("/v3/async/task-result", params={"task_id": task_id},
                        headers={"Authorization": f"Bearer {KEY}"}).json()  # fmt: skip
    payload = event["payload"]
    assert payload["extra"].pop("webhook") == webhook  # the payload echoes the webhook config
    assert payload == polled
    if status == "TASK_STATUS_SUCCEED":
        [image] = payload["images"]
        download = client.get(image["image_url"])  # signed URL, no Authorization header
        assert download.status_code == 200
        assert Image.open(io.BytesIO(download.content)).format == "PNG"
    else:
        assert payload["images"] == []
        assert payload["task"]["reason"]


def test_submit_refuses_internal_webhook_targets(
    app_and_services: tuple[TestClient, Services, ListQueue, WebhookDispatcher],
) -> None:
    client, _services, queue, _webhooks = app_and_services
    for url in ("http://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data", "file:///etc/passwd"):
        refused = _submit(client, {"webhook": {"url": url}})
        assert refused["_status"] == 400, refused
        assert refused["reason"] == "INVALID_REQUEST_BODY", refused
        assert "extra.webhook.url" in str(refused["message"])
    assert queue.items == []
