"""A ``TaskQueue`` that records what was enqueued (no worker is told)."""

from __future__ import annotations


class ListQueue:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def enqueue(self, task_id: str, lane: str) -> None:
        self.items.append((task_id, lane))
