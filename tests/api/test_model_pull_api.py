"""``POST /v3/model/pull`` + ``GET /v3/model/pull/{id}``: admin keys only, a durable background pull through the SSRF
guard, reported by every API node on the database and resumed by the next one when its node dies."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from tests.delivery.test_model_download import LORA, safetensors_bytes
from tests.support.api import KEY_A, auth, make_services
from tests.support.model_hub import Hub, running_hub
from tests.support.server import LiveServer

from underpaint.api.app import create_app
from underpaint.delivery.model_pulls import ModelPulls
from underpaint.services import Services

ADMIN = "admin-key-0123456789"
BIG = safetensors_bytes(["lora_unet_down_blocks_0.lora_down.weight", "lora_unet_down_blocks_0.lora_up.weight"], 250_000)
HELD = 1_000_000  # bytes the hub sends of BIG before it holds the download


@pytest.fixture
def hub() -> Iterator[Hub]:
    with running_hub(Hub(files={"detail.safetensors": LORA, "big.safetensors": BIG})) as h:
        yield h


def pulls_of(services: Services) -> ModelPulls:
    assert isinstance(services.model_pulls, ModelPulls)
    return services.model_pulls


@contextmanager
def node(data_dir: Path, **settings: Any) -> Iterator[TestClient]:
    """An API node over ``data_dir``'s database and models folder; its pull runner starts and stops with it, as
    ``wiring.Server`` starts and stops it."""
    models = data_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    services = make_services(models, data_dir, **{"admin_api_keys": (ADMIN,), **settings})
    pulls = pulls_of(services)
    pulls.start()
    try:
        with TestClient(create_app(services), raise_server_exceptions=False) as client:
            yield client
    finally:
        pulls.stop()


def wait_for(client: TestClient | httpx.Client, pull_id: str, done: Any = None, timeout: float = 20) -> dict[str, Any]:
    """Poll until ``done(body)`` (default: the pull ended)."""
    done = done or (lambda b: b["status"] in ("succeeded", "failed"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/v3/model/pull/{pull_id}", headers=auth(ADMIN)).json()
        if done(body):
            return body
        time.sleep(0.05)
    raise AssertionError(f"pull {pull_id} did not get there: {body}")


def test_an_admin_pulls_a_model_and_polls_its_progress(hub: Hub, tmp_path: Path) -> None:
    with node(tmp_path, model_pull_allow_hosts=("127.0.0.1",)) as client:
        r = client.post("/v3/model/pull", headers=auth(ADMIN), json={"source": f"{hub.base}/cdn/detail.safetensors"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] in ("queued", "downloading")
        done = wait_for(client, r.json()["pull_id"])
        assert done["status"] == "succeeded", done
        assert done["kind"] == "lora"
        assert done["sha256"] == hashlib.sha256(LORA).hexdigest()
        assert done["bytes_done"] == done["bytes_total"] == len(LORA)
        assert done["attempts"] == 1
        assert (tmp_path / "models" / "lora" / "detail.safetensors").read_bytes() == LORA
        listed = client.get("/v3/model", params={"filter.types": "lora"}, headers=auth(KEY_A)).json()
        assert [m["sd_name"] for m in listed["models"]] == ["detail.safetensors"]


def test_private_hosts_are_refused_unless_allowed(hub: Hub, tmp_path: Path) -> None:
    with node(tmp_path) as client:  # 127.0.0.1 is not in model_pull_allow_hosts
        r = client.post("/v3/model/pull", headers=auth(ADMIN), json={"source": f"{hub.base}/cdn/detail.safetensors"})
        done = wait_for(client, r.json()["pull_id"])
        assert done["status"] == "failed"
        assert "127.0.0.1" in done["reason"] or "loopback" in done["reason"]
        assert hub.requests == []  # never connected
        assert not (tmp_path / "models" / "lora").exists()


def test_only_admin_keys_may_pull_and_bad_bodies_are_400s(hub: Hub, tmp_path: Path) -> None:
    with node(tmp_path) as client:
        source = {"source": f"{hub.base}/cdn/detail.safetensors"}
        r = client.post("/v3/model/pull", headers=auth(KEY_A), json=source)
        assert (r.status_code, r.json()["reason"]) == (403, "ADMIN_KEY_REQUIRED")
        assert client.post("/v3/model/pull", json=source).status_code == 400  # no key at all
        assert client.get("/v3/model/pull/x", headers=auth(KEY_A)).status_code == 403
        r = client.post("/v3/model/pull", headers=auth(ADMIN), json={"source": "civitai:abc"})
        assert (r.status_code, r.json()["metadata"]["field"]) == (400, "source")
        r = client.post("/v3/model/pull", headers=auth(ADMIN), json={**source, "type": "pictures"})
        assert (r.status_code, r.json()["metadata"]["field"]) == (400, "type")
        r = client.post("/v3/model/pull", headers=auth(ADMIN), json={**source, "sha256": "abc"})
        assert (r.status_code, r.json()["metadata"]["field"]) == (400, "sha256")
        r = client.post("/v3/model/pull", headers=auth(ADMIN), json={"url": "x"})
        assert r.status_code == 400
        r = client.get("/v3/model/pull/nope", headers=auth(ADMIN))
        assert (r.status_code, r.json()["reason"]) == (404, "PULL_NOT_FOUND")
        assert hub.requests == []  # nothing refused was queued
    with node(tmp_path, admin_api_keys=()) as client:
        r = client.post("/v3/model/pull", headers=auth(ADMIN), json=source)
        assert r.status_code == 403


def test_a_pull_started_on_one_node_is_reported_by_another(hub: Hub, tmp_path: Path) -> None:
    """Two API nodes on one database and models folder: node B reports the progress of the pull node A runs (written
    while it downloads), answers a repeat of the request with the same pull, refuses a different request for the
    same source while it runs, and reports the outcome."""
    hub.hold_at = HELD
    allow = {"model_pull_allow_hosts": ("127.0.0.1",)}
    source = {"source": f"{hub.base}/cdn/big.safetensors"}
    with node(tmp_path, **allow) as a, node(tmp_path, **allow) as b:
        started = a.post("/v3/model/pull", headers=auth(ADMIN), json=source).json()
        pull_id = started["pull_id"]
        assert hub.holding.wait(20)
        running = wait_for(b, pull_id, lambda body: body["bytes_done"] >= HELD)
        assert running["status"] == "downloading"
        assert running["bytes_total"] == len(BIG)
        again = b.post("/v3/model/pull", headers=auth(ADMIN), json=source)
        assert (again.status_code, again.json()["pull_id"]) == (200, pull_id)
        other = b.post("/v3/model/pull", headers=auth(ADMIN), json={**source, "name": "other.safetensors"})
        assert (other.status_code, other.json()["reason"]) == (409, "PULL_IN_PROGRESS")
        assert other.json()["metadata"]["pull_id"] == pull_id
        hub.release.set()
        done = wait_for(b, pull_id)
        assert done["status"] == "succeeded", done
        assert done["sha256"] == hashlib.sha256(BIG).hexdigest()
        assert done["attempts"] == 1
        assert [path for path, _ in hub.requests] == ["/cdn/big.safetensors"]  # one download, by node A
        assert (tmp_path / "models" / "lora" / "big.safetensors").read_bytes() == BIG
        # Once it ended, the same source may be pulled again (here: refused, the file exists).
        r = b.post("/v3/model/pull", headers=auth(ADMIN), json=source)
        assert r.json()["pull_id"] != pull_id
        assert "exists already" in wait_for(b, r.json()["pull_id"])["reason"]


def test_a_pull_whose_node_was_killed_is_resumed_by_the_next_node(hub: Hub, tmp_path: Path) -> None:
    """A real ``underpaint serve`` downloads until the hub holds the body, then dies (SIGKILL: no shutdown hook); the
    next node on the database takes the pull once its lease ran out, resumes the partial file with a Range
    request and checks the whole file's sha256 (given by the admin)."""
    data = tmp_path / "data"
    models = data / "models"
    env = {
        "UNDERPAINT_DATABASE_URL": f"sqlite:///{data / 'tasks.db'}",
        "UNDERPAINT_ADMIN_API_KEYS": ADMIN,
        "UNDERPAINT_MODEL_PULL_ALLOW_HOSTS": "127.0.0.1",
        "UNDERPAINT_MODEL_PULL_LEASE_SECONDS": "1",
    }
    hub.hold_at = HELD
    digest = hashlib.sha256(BIG).hexdigest()
    server = LiveServer(data, models, keys=KEY_A, extra_env=env, args=("--no-worker",)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as first:
            body = {"source": f"{hub.base}/cdn/big.safetensors", "sha256": digest}
            pull_id = first.post("/v3/model/pull", headers=auth(ADMIN), json=body).json()["pull_id"]
            assert hub.holding.wait(30)
            wait_for(first, pull_id, lambda b: b["bytes_done"] >= HELD)  # its progress is in the database
        server.kill()
    finally:
        server.stop()
    parts = list((models / ".pulls").glob("*.part"))
    assert len(parts) == 1
    assert 0 < parts[0].stat().st_size <= HELD
    kept = parts[0].stat().st_size
    with node(data, model_pull_allow_hosts=("127.0.0.1",), model_pull_lease_seconds=1.0) as second:
        done = wait_for(second, pull_id)
    assert done["status"] == "succeeded", done
    assert (done["sha256"], done["attempts"]) == (digest, 2)
    assert hub.requests[-1] == ("/cdn/big.safetensors", f"bytes={kept}-")  # resumed, not started over
    assert (models / "lora" / "big.safetensors").read_bytes() == BIG
    assert not list((models / ".pulls").glob("*.part"))
