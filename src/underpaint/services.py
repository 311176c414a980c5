"""The objects one process needs, built from one ``Settings`` and passed to the API and the workers.

``build_services`` (in ``underpaint.wiring``) wires concrete backends; tests build a ``Services`` by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from underpaint.config import Settings
from underpaint.engine.registry import ModelRegistry
from underpaint.storage.base import ImageStorage
from underpaint.tasks.types import TaskQueue, TaskRecord, TaskStore


@dataclass
class Services:
    settings: Settings
    store: TaskStore
    queue: TaskQueue
    registry: ModelRegistry
    storage: ImageStorage
    # Optional collaborators, filled in by the features that need them (webhooks, rate limits, metrics ...).
    webhooks: Any = None
    rate_limiter: Any = None
    # Called once when a task ends outside a worker (a queued task cancelled by its owner): queues its webhook.
    on_terminal: Callable[[TaskRecord], None] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
