"""Submits while the broker or the database is down: nothing accepted is lost, and a 5xx is safe to retry."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from tests.support.api import auth, body, make_services, record_of, task_count

from underpaint.api.app import create_app
from underpaint.services import Services
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import IdempotencyKey, NewTask, TaskRecord, TaskStatus

SUBMIT = "/v3/async/img2img"


class DownQueue:
    """A broker that is unreachable until ``up`` is set."""

    def __init__(self) -> None:
        self.up = False
        self.sent: list[str] = []

    def enqueue(self, task_id: str, lane: str) -> None:
        if not self.up:
            raise ConnectionRefusedError("[Errno 111] Connection refused (redis 127.0.0.1:6379)")
        self.sent.append(task_id)


class FlakyStore(SqlTaskStore):
    """The database drops the connection during the first ``failures`` creates."""

    failures = 0

    def create(self, task: NewTask, idempotency: IdempotencyKey | None = None) -> TaskRecord:
        if self.failures > 0:
            self.failures -= 1
            raise OperationalError("INSERT INTO tasks ...", {}, ConnectionResetError("server closed the connection"))
        return super().create(task, idempotency)


@pytest.fixture
def down_queue() -> DownQueue:
    return DownQueue()


@pytest.fixture
def services(models_dir: Path, tmp_path: Path, down_queue: DownQueue) -> Iterator[Services]:
    services = make_services(models_dir, tmp_path, queue=down_queue)
    flaky = FlakyStore(f"sqlite:///{tmp_path / 'flaky.db'}")
    services.store.close()  # type: ignore[attr-defined]
    services = replace(services, store=flaky)
    yield services
    flaky.close()


def post(client: TestClient, payload: dict[str, Any], idem: str) -> Any:
    return client.post(SUBMIT, json=payload, headers=auth() | {"Idempotency-Key": idem})


def test_a_submit_while_the_broker_is_down_is_accepted_and_stays_queued(
    client: TestClient, services: Services, down_queue: DownQueue, png_b64: str, caplog: pytest.LogCaptureFixture
) -> None:
    payload = body(png_b64, seed=3)
    with caplog.at_level(logging.WARNING, logger="underpaint.tasks"):
        first = post(client, payload, "outage-1")
    assert first.status_code == 200, first.text
    task_id = first.json()["task_id"]
    # Written is accepted: the task waits QUEUED for a worker to take it from the store, never FAILED by the outage.
    assert record_of(services, task_id).status is TaskStatus.QUEUED
    assert any(task_id in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    down_queue.up = True
    again = post(client, payload, "outage-1")  # a client that retries anyway gets the same, live task
    assert again.json() == {"task_id": task_id}
    assert record_of(services, task_id).status is TaskStatus.QUEUED
    assert task_count(services) == 1


def test_a_submit_that_failed_on_the_database_is_retried_with_its_key(
    client: TestClient, services: Services, down_queue: DownQueue, png_b64: str
) -> None:
    assert isinstance(services.store, FlakyStore)
    services.store.failures = 1
    down_queue.up = True
    payload = body(png_b64, seed=4)
    failed = post(client, payload, "db-blip")
    assert failed.status_code == 500
    assert "retry" in failed.json()["message"]
    assert task_count(services) == 0
    retried = post(client, payload, "db-blip")
    assert retried.status_code == 200, retried.text
    task_id = retried.json()["task_id"]
    assert record_of(services, task_id).status is TaskStatus.QUEUED
    assert down_queue.sent == [task_id]
    assert post(client, payload, "db-blip").json() == {"task_id": task_id}
    assert task_count(services) == 1


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(services), raise_server_exceptions=False) as c:
        yield c
