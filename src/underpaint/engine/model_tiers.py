"""Where a checkpoint came from when a task needed it, and how much each tier holds (torch-free: the metrics read it).

Tiers, fastest first: ``device`` (the modules are resident: nothing to do), ``ram`` (its converted weights are in
the RAM tier: one copy into resident modules, or a build from memory), ``disk`` (read from the file and converted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TIERS = ("device", "ram", "disk")


@dataclass(frozen=True)
class ModelCacheReport:
    """Counters since the process started (``hits[tier]``: checkpoint requests served from that tier) and what the
    tiers hold now (``bytes[tier]``; ``disk`` has none)."""

    hits: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0  # total time spent making checkpoints resident (ram + disk tiers)
