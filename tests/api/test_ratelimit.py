"""Per-key rate limits against an in-memory stand-in for the two TaskStore methods the limiter reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.support.requests import img2img, new_task

from underpaint.api.ratelimit import RateLimiter
from underpaint.config import KeyPolicy, Settings
from underpaint.wire.errors import ApiError


@dataclass
class FakeUsage:
    """Tasks as (owner, created_at, image_num, finished)."""

    tasks: list[tuple[str, float, int, bool]] = field(default_factory=list)

    def add(self, owner: str, created_at: float, image_num: int, finished: bool = False) -> None:
        self.tasks.append((owner, created_at, image_num, finished))

    def count_unfinished(self, owner: str) -> int:
        return sum(1 for o, _, _, done in self.tasks if o == owner and not done)

    def images_created_since(self, owner: str, since: float) -> int:
        return sum(n for o, t, n, _ in self.tasks if o == owner and t >= since)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def submit(limiter: RateLimiter, store: FakeUsage, clock: Clock, key: str, image_num: int = 1) -> None:
    """What the route does: check, then create the task."""
    owner = "owner-" + key
    with limiter.admit(key, owner, image_num):
        store.add(owner, clock.now, image_num, finished=True)


def novita_default() -> Settings:
    return Settings(key_policies={"k1": KeyPolicy(images_per_minute=10), "k2": KeyPolicy(images_per_minute=10)})


def test_eleventh_image_in_a_minute_is_429_and_other_key_unaffected() -> None:
    store, clock = FakeUsage(), Clock()
    limiter = RateLimiter(novita_default(), store, clock)
    for _ in range(10):
        submit(limiter, store, clock, "k1")
        clock.now += 1.0  # images at t0 .. t0+9
    with pytest.raises(ApiError) as info:
        submit(limiter, store, clock, "k1")
    err = info.value
    assert err.status == 429
    assert err.reason == "RATE_LIMIT_EXCEEDED"
    assert err.body()["code"] == 429
    # Now is t0+10; the first image (t0) leaves the window [now-60, now] at t0+60, 50 s from now.
    assert err.headers["Retry-After"] == "51"  # whole seconds, rounded up past the boundary
    assert err.metadata == {"limit": 10, "used": 10}
    submit(limiter, store, clock, "k2")  # another key has its own budget
    assert store.images_created_since("owner-k1", 0) == 10


def test_window_slides() -> None:
    store, clock = FakeUsage(), Clock()
    limiter = RateLimiter(novita_default(), store, clock)
    submit(limiter, store, clock, "k1", image_num=8)
    clock.now += 30
    submit(limiter, store, clock, "k1", image_num=2)
    with pytest.raises(ApiError) as info:
        submit(limiter, store, clock, "k1", image_num=3)
    # The 8 images (30 s ago) must age out: 30 s more (+1 because "created at or after" keeps the boundary).
    assert 30 <= int(info.value.headers["Retry-After"]) <= 31
    clock.now += int(info.value.headers["Retry-After"])
    submit(limiter, store, clock, "k1", image_num=3)  # 2 + 3 <= 10 once the 8 left


def test_retry_after_is_the_earliest_moment_with_room() -> None:
    store, clock = FakeUsage(), Clock()
    limiter = RateLimiter(novita_default(), store, clock)
    for offset, n in ((0, 4), (20, 4), (40, 2)):
        store.add("owner-k1", clock.now + offset, n, finished=True)
    clock.now += 45
    # 10 used; asking for 5 needs the first 4 and next 4 gone -> the t0+20 task ages out at t0+80 (35 s).
    with pytest.raises(ApiError) as info:
        limiter.check("k1", "owner-k1", 5)
    retry = int(info.value.headers["Retry-After"])
    assert retry in (35, 36)
    clock.now += retry
    limiter.check("k1", "owner-k1", 5)
    clock.now -= 2
    with pytest.raises(ApiError):
        limiter.check("k1", "owner-k1", 5)


def test_image_num_above_the_limit_is_refused_outright() -> None:
    store, clock = FakeUsage(), Clock()
    limiter = RateLimiter(Settings(key_policies={"k1": KeyPolicy(images_per_minute=4)}), store, clock)
    with pytest.raises(ApiError) as info:
        limiter.check("k1", "owner-k1", 5)
    assert info.value.status == 429
    assert "image_num 5" in info.value.message
    limiter.check("k1", "owner-k1", 4)


def test_max_queued_tasks() -> None:
    store, clock = FakeUsage(), Clock()
    limiter = RateLimiter(Settings(key_policies={"k1": KeyPolicy(max_queued_tasks=2)}), store, clock)
    store.add("owner-k1", clock.now, 1)
    store.add("owner-k1", clock.now, 1)
    store.add("owner-k1", clock.now, 1, finished=True)
    with pytest.raises(ApiError) as info:
        limiter.check("k1", "owner-k1", 1)
    assert info.value.status == 429
    assert info.value.reason == "RATE_LIMIT_EXCEEDED"
    assert "queue limit" in info.value.message
    assert int(info.value.headers["Retry-After"]) >= 1
    store.tasks[0] = ("owner-k1", clock.now, 1, True)  # one finishes
    limiter.check("k1", "owner-k1", 1)


def test_default_policy_applies_to_keys_without_their_own() -> None:
    store, clock = FakeUsage(), Clock()
    settings = Settings(
        key_policies={"vip": KeyPolicy(images_per_minute=100)}, default_key_policy=KeyPolicy(images_per_minute=2)
    )
    limiter = RateLimiter(settings, store, clock)
    submit(limiter, store, clock, "anyone", image_num=2)
    with pytest.raises(ApiError):
        submit(limiter, store, clock, "anyone")
    for _ in range(5):
        submit(limiter, store, clock, "vip", image_num=8)


def test_no_policy_means_unlimited_and_no_store_reads() -> None:
    class Exploding:
        def count_unfinished(self, owner: str) -> int:
            raise AssertionError("store read without a policy")

        def images_created_since(self, owner: str, since: float) -> int:
            raise AssertionError("store read without a policy")

    limiter = RateLimiter(Settings(), Exploding())
    for _ in range(50):
        limiter.check("k", "owner", 8)


def test_admit_serializes_check_and_create_for_one_owner() -> None:
    import threading
    import time

    store, clock = FakeUsage(), Clock()
    limiter = RateLimiter(novita_default(), store, clock)
    admitted, refused = [], []

    def request() -> None:
        try:
            with limiter.admit("k1", "owner-k1", 1):
                time.sleep(0.005)  # a slow store.create: without the lock, every thread passes the check
                store.add("owner-k1", clock.now, 1)
            admitted.append(1)
        except ApiError:
            refused.append(1)

    threads = [threading.Thread(target=request) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(admitted), len(refused)) == (10, 10)


def test_with_the_real_sql_store(tmp_path: Path) -> None:
    """The limiter against SqlTaskStore (SQLite): counts come from the shared store, as across API nodes."""
    from underpaint.tasks.store import SqlTaskStore
    from underpaint.tasks.types import owner_of

    clock = Clock()
    store = SqlTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}", clock=clock)
    try:
        settings = Settings(key_policies={"k1": KeyPolicy(images_per_minute=10, max_queued_tasks=4)})
        # Two limiters = two API nodes sharing one store.
        nodes = [RateLimiter(settings, store, clock), RateLimiter(settings, store, clock)]

        def submit_real(node: int, key: str, image_num: int) -> None:
            owner = owner_of(key)
            with nodes[node].admit(key, owner, image_num):
                task_id = f"t{clock.now}-{node}-{len(key)}"
                store.create(new_task(task_id, owner, img2img(image_num=image_num)))
                clock.now += 1

        for i in range(3):
            submit_real(i % 2, "k1", 3)  # 9 images, 3 unfinished tasks
        with pytest.raises(ApiError) as info:
            submit_real(1, "k1", 2)  # 11th image
        assert info.value.status == 429
        assert info.value.metadata["used"] == 9
        assert info.value.headers["Retry-After"] == "58"  # first task (3 images) at t0 leaves at t0+60; now t0+3
        submit_real(0, "k1", 1)  # the 10th still fits; now 4 unfinished tasks
        clock.now += 60
        with pytest.raises(ApiError, match="queue limit"):
            submit_real(0, "k1", 1)
        submit_real(1, "other", 8)  # another key: no policy, no limit
    finally:
        store.close()
