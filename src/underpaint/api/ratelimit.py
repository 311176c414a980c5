"""Per-API-key limits: images per minute and unfinished (queued or running) tasks.

Off by default (self-hosted). ``settings.key_policies[api_key]`` sets a key's limits, falling back to
``settings.default_key_policy``; a ``None`` limit is unlimited. Novita's own default for img2img is 10
images per minute.

Counts come from the task store, which every API node shares, so the limits hold across nodes:

* images per minute: a sliding 60 s window over ``image_num`` of the owner's tasks created in it. A request
  that would take the window above the limit gets 429 ``RATE_LIMIT_EXCEEDED`` with ``Retry-After`` = whole
  seconds until enough of those images have aged out of the window (found by bisecting the window on the
  store, only when the limit is hit).
* queued tasks: 429 while the owner has ``max_queued_tasks`` unfinished tasks.

Check-then-create race: ``check`` and the route's ``store.create`` are two steps. ``admit`` holds a
per-owner lock over both within one process, so a process never overshoots; concurrent requests for the
same key on *different* API nodes can still each pass the check, overshooting by at most one request per
node in the gap.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from underpaint.config import KeyPolicy, Settings
from underpaint.wire.errors import rate_limited

WINDOW_SECONDS = 60.0
# No way to know when a running task ends; clients are told to come back after this.
QUEUE_RETRY_AFTER = 5
_LOCK_STRIPES = 64


class UsageStore(Protocol):
    """The two ``TaskStore`` methods the limiter reads."""

    def count_unfinished(self, owner: str) -> int: ...

    def images_created_since(self, owner: str, since: float) -> int: ...


class RateLimiter:
    def __init__(self, settings: Settings, store: UsageStore, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def policy(self, api_key: str) -> KeyPolicy | None:
        return self._settings.key_policies.get(api_key) or self._settings.default_key_policy

    def check(self, api_key: str, owner: str, image_num: int) -> None:
        """Raise ``ApiError`` 429 ``RATE_LIMIT_EXCEEDED`` (with ``Retry-After``) if this request is over a limit."""
        policy = self.policy(api_key)
        if policy is None:
            return
        if policy.max_queued_tasks is not None:
            self._check_queue(owner, policy.max_queued_tasks)
        if policy.images_per_minute is not None:
            self._check_images(owner, image_num, policy.images_per_minute)

    @contextmanager
    def admit(self, api_key: str, owner: str, image_num: int) -> Iterator[None]:
        """``check``, then hold the owner's lock while the caller creates the task (no in-process overshoot)."""
        with self._locks[zlib.crc32(owner.encode()) % _LOCK_STRIPES]:
            self.check(api_key, owner, image_num)
            yield

    def _check_queue(self, owner: str, limit: int) -> None:
        unfinished = self._store.count_unfinished(owner)
        if unfinished >= limit:
            raise rate_limited(
                f"queue limit reached: {unfinished} unfinished tasks, this API key allows {limit}",
                QUEUE_RETRY_AFTER,
                limit=limit,
                unfinished_tasks=unfinished,
            )

    def _check_images(self, owner: str, image_num: int, limit: int) -> None:
        if image_num > limit:
            raise rate_limited(
                f"image_num {image_num} exceeds this API key's limit of {limit} images per minute",
                int(WINDOW_SECONDS),
                limit=limit,
            )
        now = self._clock()
        start = now - WINDOW_SECONDS
        used = self._store.images_created_since(owner, start)
        if used + image_num <= limit:
            return
        retry_after = self._seconds_until_room(owner, start, now, limit - image_num)
        raise rate_limited(
            f"rate limit exceeded: {used} images in the last minute, this API key allows {limit} per minute",
            retry_after,
            limit=limit,
            used=used,
        )

    def _seconds_until_room(self, owner: str, start: float, now: float, allowed: int) -> int:
        """Whole seconds until at most ``allowed`` images remain in the window.

        ``images_created_since`` is non-increasing in ``since``: bisect for the earliest ``since`` in
        (start, now] whose count fits; the window reaches it after ``since - start`` seconds.
        """
        lo, hi = 0, math.ceil(WINDOW_SECONDS)  # hi seconds always suffices: the whole window has aged out
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            if self._store.images_created_since(owner, start + mid) <= allowed:
                hi = mid
            else:
                lo = mid
        return hi
