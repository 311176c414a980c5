"""The extensions that steer a task, through the HTTP API: task-cancel, Idempotency-Key, queue position, eta
and debug_info times. Real SQLite store; tasks are moved by hand where a worker would move them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.support.api import KEY_A, KEY_B, auth, body, make_services, queued, record_of, task_count

from underpaint.api.app import create_app
from underpaint.services import Services
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import CANCELLED_REASON, TaskRecord, TaskStatus

CANCEL = "/v3/async/task-cancel"
RESULT = "/v3/async/task-result"
SUBMIT = "/v3/async/img2img"


def result(client: TestClient, task_id: str, key: str = KEY_A) -> dict[str, Any]:
    r = client.get(RESULT, params={"task_id": task_id}, headers=auth(key))
    assert r.status_code == 200, r.text
    return dict(r.json())


def cancel(client: TestClient, payload: Any, key: str = KEY_A) -> Any:
    return client.post(CANCEL, json=payload, headers=auth(key))


@pytest.fixture
def announced() -> list[TaskRecord]:
    """What the API announces as ended (in a server: the webhook of the task)."""
    return []


@pytest.fixture
def services(models_dir: Path, tmp_path: Path, announced: list[TaskRecord]) -> Iterator[Services]:
    """The API tests' services, with the terminal hook recording into ``announced``."""
    services = replace(make_services(models_dir, tmp_path), on_terminal=announced.append)
    yield services
    services.store.close()  # type: ignore[attr-defined]


# --- cancel ------------------------------------------------------------------------------------------------------


def test_cancel_queued_task(client: TestClient, submit: Callable[..., Any], announced: list[TaskRecord]) -> None:
    task_id = submit().json()["task_id"]
    r = cancel(client, {"task_id": task_id})
    assert r.status_code == 200
    assert r.json() == {"task_id": task_id}
    task = result(client, task_id)["task"]
    assert (task["status"], task["reason"], task["queue_position"]) == ("TASK_STATUS_FAILED", CANCELLED_REASON, 0)
    assert [t.task_id for t in announced] == [task_id]
    again = cancel(client, {"task_id": task_id})
    assert again.status_code == 400
    assert again.json()["reason"] == "TASK_NOT_CANCELLABLE"
    assert "already ended (TASK_STATUS_FAILED)" in again.json()["message"]
    assert len(announced) == 1  # the webhook fires once


def test_cancel_processing_task_flags_it_for_the_worker(
    client: TestClient, submit: Callable[..., Any], services: Services, announced: list[TaskRecord]
) -> None:
    task_id = submit().json()["task_id"]
    services.store.claim(task_id, "w1")
    r = cancel(client, {"task_id": task_id})
    assert r.status_code == 200
    assert services.store.cancel_requested(task_id)
    assert result(client, task_id)["task"]["status"] == "TASK_STATUS_PROCESSING"  # until its worker stops
    assert announced == []  # the worker announces it when it ends it
    assert cancel(client, {"task_id": task_id}).status_code == 200  # asking twice is harmless


def test_cancel_finished_task_is_a_clear_400(
    client: TestClient, submit: Callable[..., Any], services: Services
) -> None:
    task_id = submit().json()["task_id"]
    services.store.claim(task_id, "w1")
    services.store.complete(task_id, "w1", [])
    r = cancel(client, {"task_id": task_id})
    assert r.status_code == 400
    assert r.json() == {
        "code": 400,
        "reason": "TASK_NOT_CANCELLABLE",
        "message": f"task {task_id!r} has already ended (TASK_STATUS_SUCCEED); "
        "only a queued or processing task can be cancelled",
        "metadata": {"task_id": task_id, "status": "TASK_STATUS_SUCCEED"},
    }


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        ({}, 400, "INVALID_REQUEST_BODY"),
        ({"task_id": ""}, 400, "INVALID_REQUEST_BODY"),
        ({"task_id": 12}, 400, "INVALID_REQUEST_BODY"),
        (["task_id"], 400, "INVALID_REQUEST_BODY"),
        ({"task_id": "no-such-task"}, 404, "TASK_NOT_FOUND"),
        ({"task_id": "x" * 300}, 404, "TASK_NOT_FOUND"),
    ],
)
def test_cancel_bad_requests(client: TestClient, payload: Any, status: int, reason: str) -> None:
    r = cancel(client, payload)
    assert r.status_code == status
    assert r.json()["reason"] == reason
    assert r.json()["code"] == status


def test_cancel_needs_the_owner(client: TestClient, submit: Callable[..., Any], services: Services) -> None:
    task_id = submit(key=KEY_A).json()["task_id"]
    r = cancel(client, {"task_id": task_id}, key=KEY_B)
    assert r.status_code == 404
    assert r.json()["reason"] == "TASK_NOT_FOUND"
    assert record_of(services, task_id).status is TaskStatus.QUEUED
    no_key = client.post(CANCEL, json={"task_id": task_id})
    assert (no_key.status_code, no_key.json()["reason"]) == (400, "MISSING_API_KEY")
    assert client.post(CANCEL, content=b"{not json", headers=auth()).json()["reason"] == "INVALID_REQUEST_BODY"


# --- Idempotency-Key -----------------------------------------------------------------------------------------------


def post(client: TestClient, payload: dict[str, Any], idem: str | None, key: str = KEY_A) -> Any:
    headers = auth(key) | ({"Idempotency-Key": idem} if idem is not None else {})
    return client.post(SUBMIT, json=payload, headers=headers)


def test_same_key_same_body_returns_the_same_task(client: TestClient, services: Services, png_b64: str) -> None:
    payload = body(png_b64, seed=5)
    first = post(client, payload, "retry-1")
    assert first.status_code == 200
    reordered = {"request": dict(reversed(list(payload["request"].items())))}  # same JSON, other key order
    again = post(client, reordered, "retry-1")
    assert again.status_code == 200
    assert again.json() == first.json()
    assert task_count(services) == 1
    assert len(queued(services)) == 1  # queued once
    assert post(client, payload, None).json()["task_id"] != first.json()["task_id"]  # no header: a new task
    other_key = post(client, payload, "retry-1", key=KEY_B)  # keys are per API key
    assert other_key.status_code == 200
    assert other_key.json()["task_id"] != first.json()["task_id"]
    assert task_count(services) == 3


def test_same_key_other_body_is_409(client: TestClient, services: Services, png_b64: str) -> None:
    first = post(client, body(png_b64, seed=5), "k").json()["task_id"]
    r = post(client, body(png_b64, seed=6), "k")
    assert r.status_code == 409
    data = r.json()
    assert (data["code"], data["reason"]) == (409, "IDEMPOTENCY_KEY_REUSED")
    assert "different request body" in data["message"]
    assert data["metadata"] == {"idempotency_key": "k", "task_id": first}
    assert task_count(services) == 1


@pytest.mark.parametrize("header", [b"", b"   ", b"x" * 256, "caf\u00e9".encode(), b"a\tb"])
def test_bad_idempotency_key_is_400(client: TestClient, png_b64: str, header: bytes) -> None:
    headers: dict[str, Any] = {**auth(), "Idempotency-Key": header}
    r = client.post(SUBMIT, json=body(png_b64), headers=headers)
    assert r.status_code == 400
    assert r.json()["reason"] == "INVALID_REQUEST_BODY"
    assert "Idempotency-Key" in r.json()["message"]


def test_concurrent_submits_with_one_key_create_one_task(client: TestClient, services: Services, png_b64: str) -> None:
    payload = body(png_b64, seed=9)
    answers: list[Any] = []
    start = threading.Barrier(8)

    def go() -> None:
        start.wait()
        answers.append(post(client, payload, "race"))

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a.status_code for a in answers] == [200] * 8
    assert len({a.json()["task_id"] for a in answers}) == 1
    assert task_count(services) == 1


# --- queue position, eta, debug_info -------------------------------------------------------------------------------


def test_queue_position_of_several_queued_tasks(
    client: TestClient, submit: Callable[..., Any], services: Services
) -> None:
    ids = [submit(seed=i).json()["task_id"] for i in range(4)]
    assert [result(client, t)["task"]["queue_position"] for t in ids] == [1, 2, 3, 4]
    # KEY_A's dedicated lane runs first (priority): it goes to the head of the queue.
    gold = submit(extra={"enterprise_plan": {"enabled": True}}).json()["task_id"]
    assert result(client, gold)["task"]["queue_position"] == 1
    assert [result(client, t)["task"]["queue_position"] for t in ids] == [2, 3, 4, 5]
    claimed = services.store.claim(None, "w1")
    assert claimed is not None
    assert claimed.task_id == gold
    assert result(client, gold)["task"]["queue_position"] == 0
    cancel(client, {"task_id": ids[1]})
    assert [result(client, t)["task"]["queue_position"] for t in ids] == [1, 0, 2, 3]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocked(services: Services, tmp_path: Path) -> Iterator[tuple[TestClient, Services, Clock]]:
    clock = Clock()
    store = SqlTaskStore(f"sqlite:///{tmp_path / 'clocked.db'}", clock=clock)
    services = replace(services, store=store)
    with TestClient(create_app(services), raise_server_exceptions=False) as c:
        yield c, services, clock
    store.close()


def test_eta_of_a_queued_task_counts_the_tasks_ahead(clocked: tuple[TestClient, Services, Clock], png_b64: str) -> None:
    client, services, clock = clocked
    first = post(client, body(png_b64), None).json()["task_id"]
    assert result(client, first)["task"]["eta"] == 0  # nothing has run yet: no estimate
    for seconds in (8.0, 12.0):  # two runs of 10 s on average
        done = post(client, body(png_b64), None).json()["task_id"]
        services.store.claim(done, "w")
        clock.now += seconds
        services.store.complete(done, "w", [])
    # A new app: the mean run time is cached for a few seconds per app.
    with TestClient(create_app(services), raise_server_exceptions=False) as fresh:
        second = post(fresh, body(png_b64), None).json()["task_id"]
        assert [result(fresh, t)["task"]["eta"] for t in (first, second)] == [10, 20]
        services.store.claim(first, "w")
        services.store.update_progress(first, "w", 40, 6)
        assert result(fresh, first)["task"]["eta"] == 6  # running: the worker's own estimate
        assert result(fresh, second)["task"]["eta"] == 10


def test_debug_info_times_are_the_real_ones(clocked: tuple[TestClient, Services, Clock], png_b64: str) -> None:
    client, services, clock = clocked
    task_id = post(client, body(png_b64), None).json()["task_id"]
    submitted = clock.now
    clock.now += 1.5
    services.store.claim(task_id, "w")
    clock.now += 3.25
    services.store.complete(task_id, "w", [])
    debug = result(client, task_id)["extra"]["debug_info"]
    assert debug == {
        "submit_time_ms": int(submitted * 1000),
        "execute_time_ms": int((submitted + 1.5) * 1000),
        "complete_time_ms": int((submitted + 4.75) * 1000),
    }


def test_debug_info_of_a_live_task_brackets_the_request(
    client: TestClient, submit: Callable[..., Any], services: Services
) -> None:
    before = time.time()
    task_id = submit().json()["task_id"]
    after = time.time()
    debug = result(client, task_id)["extra"]["debug_info"]
    assert int(before * 1000) <= debug["submit_time_ms"] <= int(after * 1000) + 1
    assert (debug["execute_time_ms"], debug["complete_time_ms"]) == (0, 0)
