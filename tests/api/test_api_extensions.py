"""The read-only extension routes (``GET /v3/async/tasks``, ``GET /v3/async/queue``) and the browser routes
(``/``, ``/playground``, its assets, ``/docs``)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.support.api import KEY_A, KEY_B, auth, b64, body, image_bytes, make_services

from underpaint.api.app import create_app
from underpaint.scale.heartbeat import Heartbeat, worker_states
from underpaint.services import Services, WorkerState
from underpaint.vocabulary import PREPROCESSOR_NAMES, SAMPLER_NAMES

TASKS = "/v3/async/tasks"
QUEUE = "/v3/async/queue"


def ids(client: TestClient, key: str = KEY_A, **params: Any) -> list[str]:
    r = client.get(TASKS, params=params, headers=auth(key))
    assert r.status_code == 200, r.text
    return [t["task_id"] for t in r.json()["tasks"]]


# ---------------------------------------------------------------------------------------------------- tasks


def test_tasks_need_a_key(client: TestClient) -> None:
    assert client.get(TASKS).json()["reason"] == "MISSING_API_KEY"
    r = client.get(TASKS, headers=auth("nope"))
    assert (r.status_code, r.json()["reason"]) == (403, "INVALID_API_KEY")
    assert client.get(QUEUE).json()["reason"] == "MISSING_API_KEY"
    assert client.get(QUEUE, headers=auth("nope")).status_code == 403


def test_tasks_are_the_callers_newest_first(client: TestClient, submit: Any, services: Services) -> None:
    mine = []
    for i in range(3):
        mine.append(submit(image_num=i + 1).json()["task_id"])
        time.sleep(0.002)
    theirs = submit(key=KEY_B).json()["task_id"]
    assert ids(client) == mine[::-1]
    assert ids(client, KEY_B) == [theirs]
    body = client.get(TASKS, headers=auth()).json()["tasks"]
    assert [t["image_num"] for t in body] == [3, 2, 1]
    newest = body[0]
    assert newest["status"] == "TASK_STATUS_QUEUED"
    assert (newest["progress_percent"], newest["eta"], newest["reason"], newest["finished_time_ms"]) == (0, 0, "", 0)
    assert abs(newest["created_time_ms"] / 1000 - time.time()) < 60

    assert services.store.claim(mine[0], "w") is not None
    services.store.update_progress(mine[0], "w", 55, 4)
    services.store.fail(mine[1], None, "broke")
    by_id = {t["task_id"]: t for t in client.get(TASKS, headers=auth()).json()["tasks"]}
    assert (by_id[mine[0]]["status"], by_id[mine[0]]["progress_percent"], by_id[mine[0]]["eta"]) == (
        "TASK_STATUS_PROCESSING",
        55,
        4,
    )
    assert (by_id[mine[1]]["status"], by_id[mine[1]]["reason"]) == ("TASK_STATUS_FAILED", "broke")
    assert by_id[mine[1]]["finished_time_ms"] >= by_id[mine[1]]["created_time_ms"] > 0


def test_tasks_limit(client: TestClient, submit: Any) -> None:
    made = [submit().json()["task_id"] for _ in range(23)]
    assert len(ids(client)) == 20  # the default
    assert len(ids(client, limit=100)) == 23
    assert ids(client, limit=2) == ids(client)[:2]
    assert set(ids(client, limit=100)) == set(made)
    for bad in ("0", "101", "-1", "abc", "2.5"):
        r = client.get(TASKS, params={"limit": bad}, headers=auth())
        assert r.status_code == 400, bad
        assert r.json()["reason"] == "INVALID_REQUEST_BODY"
        assert r.json()["metadata"] == {"field": "limit"}


# ---------------------------------------------------------------------------------------------------- queue


def test_queue_counts_overall_and_own(client: TestClient, submit: Any, services: Services) -> None:
    a = [submit().json()["task_id"] for _ in range(3)]
    b = [submit(key=KEY_B).json()["task_id"] for _ in range(2)]
    services.store.claim(a[0], "w")
    services.store.claim(b[0], "w")
    services.store.fail(b[1], None, "x")
    q = client.get(QUEUE, headers=auth()).json()
    assert q["queue"] == {"queued": 2, "processing": 2}
    assert q["mine"] == {"queued": 2, "processing": 1}
    assert client.get(QUEUE, headers=auth(KEY_B)).json()["mine"] == {"queued": 0, "processing": 1}
    assert q["mode"] == "embedded"
    assert (q["workers"], q["workers_alive"]) == ([], 0)  # no worker in this process (tests build none)


def test_queue_shows_the_embedded_worker(models_dir: Path, tmp_path: Path) -> None:
    alive = {"now": True}

    def workers() -> list[WorkerState]:
        return [WorkerState("embedded", "process", alive["now"], concurrency=1, queues=("*",))]

    services = replace(make_services(models_dir, tmp_path), workers=workers)
    with TestClient(create_app(services)) as client:
        task_id = client.post("/v3/async/img2img", json=body(b64(image_bytes())), headers=auth()).json()["task_id"]
        q = client.get(QUEUE, headers=auth()).json()
        assert q["workers"] == [
            {
                "worker_id": "embedded",
                "kind": "process",
                "alive": True,
                "busy": 0,
                "concurrency": 1,
                "queues": ["*"],
                "last_seen_seconds_ago": None,
            }
        ]
        assert services.store.claim(task_id, "w") is not None
        alive["now"] = False
        q = client.get(QUEUE, headers=auth()).json()
    services.store.close()  # type: ignore[attr-defined]
    # the embedded worker does not count its tasks: busy is the store's count of running tasks
    assert (q["workers"][0]["alive"], q["workers"][0]["busy"], q["workers_alive"]) == (False, 1, 0)


def test_queue_lists_celery_workers_from_their_heartbeats(models_dir: Path, tmp_path: Path) -> None:
    base = make_services(models_dir, tmp_path, queue_backend="celery")
    engine = base.store.engine  # type: ignore[attr-defined]
    services = replace(base, workers=lambda: worker_states(engine, base.settings.lease_seconds))
    beats = [
        Heartbeat(engine, ("sd15", "sdxl"), 2, lambda: {"busy": 1, "tasks_done": 5, "model_loads": 1}),
        Heartbeat(engine, ("gold",), 1, lambda: {"busy": 0, "tasks_done": 0, "model_loads": 0}),
    ]
    beats[1].worker_id = "other-host:1"
    beats[1].clock = lambda: time.time() - 3600  # a worker that stopped beating an hour ago
    beats[1].started_at = time.time() - 7200
    for beat in beats:
        beat.beat()
    with TestClient(create_app(services)) as client:
        q = client.get(QUEUE, headers=auth()).json()
    services.store.close()  # type: ignore[attr-defined]
    assert q["mode"] == "celery"
    workers = {w["worker_id"]: w for w in q["workers"]}
    assert set(workers) == {beats[0].worker_id, "other-host:1"}
    live = workers[beats[0].worker_id]
    assert (live["kind"], live["alive"], live["busy"], live["concurrency"], live["queues"]) == (
        "celery",
        True,
        1,
        2,
        ["sd15", "sdxl"],
    )
    assert live["last_seen_seconds_ago"] < 60
    assert workers["other-host:1"]["alive"] is False
    assert workers["other-host:1"]["last_seen_seconds_ago"] >= 3600
    assert q["workers_alive"] == 1


# ---------------------------------------------------------------------------------------------------- pages


@pytest.fixture
def page_client(services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(services), follow_redirects=False) as c:
        yield c


def test_root_redirects_to_the_playground(page_client: TestClient) -> None:
    r = page_client.get("/")
    assert (r.status_code, r.headers["location"]) == (307, "/playground")


def test_playground_page_carries_the_servers_vocabularies(page_client: TestClient) -> None:
    r = page_client.get("/playground")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in r.headers["content-security-policy"]
    found = re.search(r'<script id="underpaint-vocabulary" type="application/json">(.*?)</script>', r.text)
    assert found is not None
    vocab = json.loads(found.group(1))
    assert vocab == {"samplers": list(SAMPLER_NAMES), "preprocessors": sorted(PREPROCESSOR_NAMES)}
    assert "__" not in r.text  # every placeholder filled
    assert "<script>" not in r.text
    assert " on" + "click=" not in r.text


def test_playground_assets(page_client: TestClient) -> None:
    page = page_client.get("/playground").text
    links = re.findall(r'"/playground/([\w.]+)\?v=(\w+)"', page)
    assert {name for name, _ in links} == {"playground.css", "playground.js", "inpaint.js"}
    for name, version in links:
        r = page_client.get(f"/playground/{name}", params={"v": version})
        assert r.status_code == 200
        assert r.content
        assert "immutable" in r.headers["cache-control"]
        assert page_client.get(f"/playground/{name}").headers["cache-control"] == "no-cache"
    assert page_client.get("/playground/playground.js").headers["content-type"].startswith("text/javascript")
    # the page takes names from the server, never its own copy of them
    script = page_client.get("/playground/playground.js").text
    assert "Euler a" not in script
    assert "DPM++" not in script
    assert "depth_midas" not in script


def test_docs_page_is_self_contained(page_client: TestClient) -> None:
    r = page_client.get("/docs")
    assert r.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert sources
    assert all(s.startswith(("/", "data:")) for s in sources), sources  # nothing from a CDN
    for s in sources:
        if s.startswith("/playground/"):
            assert page_client.get(s).status_code == 200, s
