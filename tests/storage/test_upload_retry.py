"""``UploadRetry``: transient storage failures are retried with backoff within one budget per outage."""

from __future__ import annotations

import logging

import pytest

from underpaint.storage.base import StorageError
from underpaint.storage.retry import StorageGate, UploadRetry


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


def test_an_outage_is_exhausted_once_it_spent_the_budget_until_it_ends() -> None:
    t = FakeTime()
    r = retry(t, budget=10.0)
    with pytest.raises(StorageError):
        r.run(Outage(failures=3, permanent=True), "a", "upload")
    assert not r.exhausted()  # a permanent error is no outage
    assert r.run(Outage(failures=3), "b", "upload") == "stored"
    assert not r.exhausted()  # an outage within the budget
    with pytest.raises(StorageError):
        r.run(Outage(failures=100), "c", "upload")
    assert r.exhausted()
    t.now += 60  # however long nothing is tried, the outage is not over until something says so
    assert r.exhausted()
    r.end_outage()
    assert not r.exhausted()
    # The next failure starts a new outage with a fresh budget: retried for 10 s again.
    t.sleeps.clear()
    with pytest.raises(StorageError):
        r.run(Outage(failures=100), "d", "upload")
    assert sum(t.sleeps) == pytest.approx(10.0)
    assert r.exhausted()
    assert r.run(Outage(failures=0), "e", "upload") == "stored"  # an upload that succeeds ends it too
    assert not r.exhausted()


def test_a_sibling_has_the_same_budget_and_an_outage_of_its_own() -> None:
    t, counted = FakeTime(), list[int]()
    r = retry(t, budget=10.0, counted=counted)
    other = r.sibling()
    with pytest.raises(StorageError):
        other.run(Outage(failures=100), "a", "upload to the user's bucket")
    assert t.now == pytest.approx(10.0)
    assert other.exhausted()
    assert not r.exhausted()
    assert len(counted) == len(t.sleeps) > 0  # its retries count in the same metric


class Probe:
    """The storage's ``reachable()``: down while ``down``; counts its calls."""

    def __init__(self) -> None:
        self.down = True
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.down:
            raise OSError("connection refused")  # a probe that raises counts as unreachable
        return "ok"


def exhausted_gate(t: FakeTime, changes: list[bool]) -> tuple[UploadRetry, StorageGate, Probe]:
    r = retry(t, budget=1.0)
    probe = Probe()
    gate = StorageGate(r, probe, first_interval=1.0, max_interval=4.0, on_change=changes.append, clock=t.clock)
    assert gate.open()  # no outage: claims without probing
    assert probe.calls == 0
    with pytest.raises(StorageError):
        r.run(Outage(failures=100), "a", "upload")
    return r, gate, probe


def test_the_gate_closes_after_an_exhausted_outage_and_opens_when_a_probe_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t, changes = FakeTime(), list[bool]()
    r, gate, probe = exhausted_gate(t, changes)
    with caplog.at_level(logging.WARNING, logger="underpaint.storage"):
        assert not gate.open()
        assert gate.paused
        assert changes == [True]
        # Probed at a growing interval (1, 2, 4, 4 s), not at each claim attempt.
        probed_at: list[float] = []
        for _ in range(120):
            t.now += 0.25
            calls = probe.calls
            assert not gate.open()
            if probe.calls > calls:
                probed_at.append(t.now - 1.0)  # seconds since the first probe (t=1.0 after the outage)
        assert probed_at[:5] == pytest.approx([1.0, 3.0, 7.0, 11.0, 15.0])
        assert changes == [True]  # paused once, not once per probe
        probe.down = False
        t.now += 4
        assert gate.open()
    assert not gate.paused
    assert not r.exhausted()  # the outage is over: the next failure gets a fresh budget
    assert changes == [True, False]
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert sum("claims no task until the storage answers" in w for w in warnings) == 1
    assert sum("claiming tasks again" in w for w in warnings) == 1


def test_the_gate_opens_without_a_probe_when_an_upload_succeeded_meanwhile() -> None:
    t, changes = FakeTime(), list[bool]()
    r, gate, probe = exhausted_gate(t, changes)
    assert not gate.open()
    assert r.run(Outage(failures=0), "b", "upload") == "stored"  # the batch in hand's next upload went up
    calls = probe.calls
    assert gate.open()
    assert probe.calls == calls
    assert changes == [True, False]


def test_a_storage_that_answers_at_once_never_pauses_claiming() -> None:
    t, changes = FakeTime(), list[bool]()
    r, gate, probe = exhausted_gate(t, changes)
    probe.down = False  # the outage ended just as the upload gave up
    assert gate.open()
    assert probe.calls == 1
    assert not r.exhausted()
    assert changes == []
