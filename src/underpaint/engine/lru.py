"""A small thread-safe LRU of loaded models (ControlNets, upscalers): the key says which file version and
settings a value was loaded for, so a replaced file is loaded afresh."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger(__name__)


LOAD_TIER = "disk"  # where every model but a checkpoint comes from (checkpoints have a RAM tier: engine.loader)


def logged_load(kind: str, name: str, load: Callable[[], V]) -> V:
    """``load()``, then the operator's one INFO line per model load: what kind, which file, how many seconds, from
    which tier (always the disk; checkpoints log their own, with the tier they came from)."""
    start = time.perf_counter()
    value = load()
    seconds = time.perf_counter() - start
    log.info(
        "%s %s loaded in %.2f s (tier %s)", kind, name, seconds, LOAD_TIER,
        extra={"model_kind": kind, "model": name, "load_seconds": round(seconds, 3), "tier": LOAD_TIER},
    )  # fmt: skip
    return value


class LoadedLru(Generic[K, V]):
    """Values by key, the least recently used evicted beyond ``capacity``; ``loads`` counts calls to ``load``.

    ``load`` runs outside the lock (a load takes seconds; other keys stay readable meanwhile)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.loads = 0
        self._values: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, load: Callable[[], V]) -> V:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = load()
        with self._lock:
            self.loads += 1
            self._values[key] = value
            while len(self._values) > self.capacity:
                self._values.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
