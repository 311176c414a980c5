"""``UploadRetry``: transient storage failures are retried with backoff within one budget per outage."""

from __future__ import annotations

import logging

import pytest

from underpaint.storage.base import StorageError
from underpaint.storage.retry import UploadRetry


class Outage:
    """An upload that fails transiently ``failures`` times (``permanent`` makes the failures final)."""

    def __init__(self, failures: int, permanent: bool = False) -> None:
        self.failures = failures
        self.permanent = permanent
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise StorageError("S3 upload failed: cannot reach the S3 endpoint", transient=not self.permanent)
        return "stored"


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def retry(t: FakeTime, budget: float = 60.0, counted: list[int] | None = None) -> UploadRetry:
    on_retry = (lambda: counted.append(1)) if counted is not None else None
    return UploadRetry(budget, first_delay=0.5, max_delay=4.0, on_retry=on_retry, sleep=t.sleep, clock=t.clock)


def test_a_short_outage_is_waited_out_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    t, counted = FakeTime(), list[int]()
    upload = Outage(failures=5)
    with caplog.at_level(logging.WARNING, logger="underpaint.storage"):
        assert retry(t, counted=counted).run(upload, "task-7", "upload of task-7/a.png") == "stored"
    assert upload.calls == 6
    assert t.sleeps == [0.5, 1.0, 2.0, 4.0, 4.0]  # doubling, capped
    assert len(counted) == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5
    assert all("task task-7" in w and "upload of task-7/a.png" in w for w in warnings)


def test_an_outage_longer_than_the_budget_fails_and_the_budget_is_shared() -> None:
    t = FakeTime()
    r = retry(t, budget=10.0)
    with pytest.raises(StorageError):
        r.run(Outage(failures=100), "a", "upload")
    assert t.now == pytest.approx(10.0)  # never sleeps past the budget
    # The next task in the same outage does not get a budget of its own: it fails at once.
    second = Outage(failures=100)
    with pytest.raises(StorageError):
        r.run(second, "b", "upload")
    assert second.calls == 1
    # Storage back: the next outage has a fresh budget.
    assert r.run(Outage(failures=0), "c", "upload") == "stored"
    assert r.run(Outage(failures=2), "d", "upload") == "stored"


def test_a_pause_longer_than_the_budget_starts_a_new_outage() -> None:
    t = FakeTime()
    r = retry(t, budget=10.0)
    with pytest.raises(StorageError):
        r.run(Outage(failures=100), "a", "upload")
    t.now += 60  # no upload tried for a minute
    assert r.run(Outage(failures=2), "b", "upload") == "stored"


def test_permanent_errors_and_a_stopped_task_are_not_retried() -> None:
    t = FakeTime()
    denied = Outage(failures=1, permanent=True)
    with pytest.raises(StorageError):
        retry(t).run(denied, "a", "upload")
    assert denied.calls == 1
    cancelled = Outage(failures=100)
    with pytest.raises(StorageError):
        retry(t).run(cancelled, "b", "upload", should_stop=lambda: True)
    assert cancelled.calls == 1
    assert t.sleeps == []
