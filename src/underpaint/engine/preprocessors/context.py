"""What a preprocessor runs with: the annotator folder, the task seed, the device and the executor's network cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

import torch

from underpaint.engine.job import JobError
from underpaint.engine.lru import logged_load

T = TypeVar("T")

# A1111's preprocessor resolution when the request sets none (its API's default processor_res); the depth family
# detects at it (their networks were trained around this size), the other annotators at the output size.
A1111_RESOLUTION = 512
# Loaded annotator networks kept per executor, least recently used dropped beyond it (most are 0.1-0.5 GB,
# Zoe 1.4 GB).
DEFAULT_LOADED_LIMIT = 4

CacheKey = tuple[str, Path, float, str]


class AnnotatorCache:
    """Loaded annotator networks (torch modules, ONNX sessions), keyed by kind, file, file mtime and device; a
    replaced file is loaded afresh. Owned by the executor, like ``ModelCache``; thread-safe."""

    def __init__(self, limit: int = DEFAULT_LOADED_LIMIT) -> None:
        self.limit = limit
        self.loads = 0
        self._items: OrderedDict[CacheKey, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, kind: str, path: Path, device: str, load: Callable[[], T]) -> T:
        """The cached value for ``(kind, path, device)``, loaded with ``load()`` when absent or when the file
        changed. Raises ``JobError`` when the file is gone."""
        try:
            mtime = path.stat().st_mtime
        except OSError as exc:
            raise JobError(f"annotator weights {path.name} are gone from {path.parent}: {exc}") from exc
        key = (kind, path, mtime, device)
        with self._lock:
            if key not in self._items:
                self._items[key] = logged_load("annotator", f"{kind}:{path.name}", load)
                self.loads += 1
                while len(self._items) > self.limit:
                    self._items.popitem(last=False)
            self._items.move_to_end(key)
            return cast(T, self._items[key])

    def kinds(self) -> set[str]:
        with self._lock:
            return {key[0] for key in self._items}

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass(frozen=True)
class Context:
    annotator_dir: Path
    seed: int
    device: torch.device
    nets: AnnotatorCache = field(default_factory=AnnotatorCache)
    # The depth family's detection resolution (short side); tests lower it to keep the full-size networks fast.
    depth_resolution: int = A1111_RESOLUTION
