"""``POST /v3/model/pull`` + ``GET /v3/model/pull/{id}``: admin keys only, a background pull through the SSRF guard."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.delivery.test_model_download import LORA
from tests.support.api import KEY_A, auth, make_services
from tests.support.model_hub import Hub, running_hub

from underpaint.api.app import create_app

ADMIN = "admin-key-0123456789"


@pytest.fixture
def hub() -> Iterator[Hub]:
    with running_hub(Hub(files={"detail.safetensors": LORA})) as h:
        yield h


def client_for(tmp_path: Path, **settings: Any) -> TestClient:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    services = make_services(models, tmp_path, **{"admin_api_keys": (ADMIN,), **settings})
    return TestClient(create_app(services), raise_server_exceptions=False)


def wait_for(client: TestClient, pull_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/v3/model/pull/{pull_id}", headers=auth(ADMIN)).json()
        if body["status"] in ("succeeded", "failed"):
            return body
        time.sleep(0.05)
    raise AssertionError("the pull did not finish")


def test_an_admin_pulls_a_model_and_polls_its_progress(hub: Hub, tmp_path: Path) -> None:
    with client_for(tmp_path, model_pull_allow_hosts=("127.0.0.1",)) as client:
        r = client.post("/v3/model/pull", headers=auth(ADMIN), json={"source": f"{hub.base}/cdn/detail.safetensors"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] in ("queued", "downloading")
        done = wait_for(client, r.json()["pull_id"])
        assert done["status"] == "succeeded", done
        assert done["kind"] == "lora"
        assert done["sha256"] == hashlib.sha256(LORA).hexdigest()
        assert done["bytes_done"] == done["bytes_total"] == len(LORA)
        assert (tmp_path / "models" / "lora" / "detail.safetensors").read_bytes() == LORA
        listed = client.get("/v3/model", params={"filter.types": "lora"}, headers=auth(KEY_A)).json()
        assert [m["sd_name"] for m in listed["models"]] == ["detail.safetensors"]


def test_private_hosts_are_refused_unless_allowed(hub: Hub, tmp_path: Path) -> None:
    with client_for(tmp_path) as client:  # 127.0.0.1 is not in model_pull_allow_hosts
        r = client.post("/v3/model/pull", headers=auth(ADMIN), json={"source": f"{hub.base}/cdn/detail.safetensors"})
        done = wait_for(client, r.json()["pull_id"])
        assert done["status"] == "failed"
        assert "127.0.0.1" in done["reason"] or "loopback" in done["reason"]
        assert hub.requests == []  # never connected
        assert not (tmp_path / "models" / "lora").exists()


def test_only_admin_keys_may_pull_and_bad_bodies_are_400s(hub: Hub, tmp_path: Path) -> None:
    with client_for(tmp_path) as client:
        source = {"source": f"{hub.base}/cdn/detail.safetensors"}
        r = client.post("/v3/model/pull", headers=auth(KEY_A), json=source)
        assert (r.status_code, r.json()["reason"]) == (403, "ADMIN_KEY_REQUIRED")
        assert client.post("/v3/model/pull", json=source).status_code == 400  # no key at all
        assert client.get("/v3/model/pull/x", headers=auth(KEY_A)).status_code == 403
        r = client.post("/v3/model/pull", headers=auth(ADMIN), json={"source": "civitai:abc"})
        assert (r.status_code, r.json()["metadata"]["field"]) == (400, "source")
        r = client.post("/v3/model/pull", headers=auth(ADMIN), json={"url": "x"})
        assert r.status_code == 400
        r = client.get("/v3/model/pull/nope", headers=auth(ADMIN))
        assert (r.status_code, r.json()["reason"]) == (404, "PULL_NOT_FOUND")
    with client_for(tmp_path, admin_api_keys=()) as client:
        r = client.post("/v3/model/pull", headers=auth(ADMIN), json=source)
        assert r.status_code == 403
