"""Durable model pulls (``delivery.model_pulls``): leases, giving up, handing back on stop, purging."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select, update
from tests.delivery.test_model_download import safetensors_bytes
from tests.support.model_hub import Hub, running_hub

from underpaint.db.engine import open_engine
from underpaint.db.migrations import migrate
from underpaint.db.schema import model_pulls_table
from underpaint.delivery.model_pulls import ModelPulls

BIG = safetensors_bytes(["lora_unet_down_blocks_0.lora_down.weight", "lora_unet_down_blocks_0.lora_up.weight"], 250_000)
HELD = 1_000_000


@pytest.fixture
def hub() -> Iterator[Hub]:
    with running_hub(Hub(files={"big.safetensors": BIG})) as h:
        yield h


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = open_engine(f"sqlite:///{tmp_path / 'pulls.db'}")
    migrate(made)
    yield made
    made.dispose()


def pulls(engine: Engine, tmp_path: Path, lease: float = 30.0) -> ModelPulls:
    return ModelPulls(engine, tmp_path / "models", lambda: httpx.Client(timeout=10), lease_seconds=lease)


def row(engine: Engine, pull_id: str) -> dict[str, object]:
    with engine.connect() as conn:
        found = conn.execute(select(model_pulls_table).where(model_pulls_table.c.pull_id == pull_id)).first()
    assert found is not None
    return dict(found._mapping)


def wait_until(check: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_stopped_runner_hands_its_pull_back_and_the_next_resumes_it(hub: Hub, engine: Engine, tmp_path: Path) -> None:
    hub.hold_at = HELD
    first = pulls(engine, tmp_path)
    pull_id = str(first.submit(f"{hub.base}/cdn/big.safetensors", None, None, None)["pull_id"])
    assert hub.holding.wait(20)
    wait_until(lambda: row(engine, pull_id)["bytes_done"] == HELD)  # written by the heartbeat, within a second
    hub.release.set()  # the rest comes, but the runner stops at its next chunk
    first.stop()
    state = row(engine, pull_id)
    assert (state["status"], state["attempts"], state["runner"]) == ("queued", 0, None)
    part = next((tmp_path / "models" / ".pulls").glob("*.part"))
    kept = part.stat().st_size
    assert kept >= HELD
    second = pulls(engine, tmp_path)
    assert second.run_once()
    state = row(engine, pull_id)
    assert (state["status"], state["attempts"], state["active_key"]) == ("succeeded", 1, None)
    assert state["sha256"] == hashlib.sha256(BIG).hexdigest()
    assert hub.requests[-1] == ("/cdn/big.safetensors", f"bytes={kept}-")


def test_a_pull_interrupted_too_often_fails_with_the_reason(hub: Hub, engine: Engine, tmp_path: Path) -> None:
    hub.hold_at = HELD
    runner = pulls(engine, tmp_path, lease=1.0)
    runner.max_attempts = 2
    source = f"{hub.base}/cdn/big.safetensors"
    pull_id = str(runner.submit(source, None, None, None)["pull_id"])
    assert hub.holding.wait(20)
    hub.release.set()
    runner.stop()
    asked = len(hub.requests)
    with engine.begin() as conn:  # as a runner that died on its second try leaves it
        conn.execute(
            update(model_pulls_table)
            .where(model_pulls_table.c.pull_id == pull_id)
            .values(status="downloading", attempts=2, runner="gone:1", lease_expires_at=time.time() - 1)
        )
    assert runner.run_once()
    state = row(engine, pull_id)
    assert state["status"] == "failed"
    assert "interrupted 2 times" in str(state["reason"])
    assert "pull the same source again" in str(state["reason"])
    assert state["active_key"] is None
    assert len(hub.requests) == asked  # given up on without another download
    assert not runner.run_once()  # nothing left to take
    # the source is free again
    assert runner.submit(source, None, None, None)["pull_id"] != pull_id


def test_a_live_lease_is_left_alone_and_a_lost_one_stops_the_download(hub: Hub, engine: Engine, tmp_path: Path) -> None:
    hub.hold_at = HELD
    first = pulls(engine, tmp_path, lease=1.5)
    pull_id = str(first.submit(f"{hub.base}/cdn/big.safetensors", None, None, None)["pull_id"])
    assert hub.holding.wait(20)
    other = pulls(engine, tmp_path, lease=1.5)
    time.sleep(2)  # longer than the lease: only the first runner's heartbeat keeps it
    assert not other.run_once()
    with engine.begin() as conn:  # another runner took it (as after a lease lost in a long database outage)
        conn.execute(update(model_pulls_table).values(runner="elsewhere:1"))
    time.sleep(1)  # the first runner's next heartbeat finds the pull taken
    hub.release.set()
    time.sleep(0.5)
    state = row(engine, pull_id)
    assert (state["status"], state["runner"]) == ("downloading", "elsewhere:1")  # the first runner wrote nothing
    assert not (tmp_path / "models" / "lora").exists()  # and stopped before finishing the file
    first.stop()


def test_ended_pulls_are_purged_after_retention(hub: Hub, engine: Engine, tmp_path: Path) -> None:
    runner = pulls(engine, tmp_path)
    source = f"{hub.base}/cdn/big.safetensors"
    pull_id = str(runner.submit(source, None, None, None)["pull_id"])
    wait_until(lambda: row(engine, pull_id)["status"] == "succeeded")
    runner.stop()
    assert runner.purge(time.time() - 60) == 0
    assert runner.purge(time.time() + 1) == 1
    assert runner.status(pull_id) is None
