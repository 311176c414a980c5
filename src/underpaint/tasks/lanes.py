"""Which queue a task goes to. The API decides at submit and stores the answer as the task's ``lane``.

Queue names:

- ``sd15`` / ``sdxl``: by the checkpoint's base model, so a worker only ever loads models of one family;
- ``sd15.<stem>`` / ``sdxl.<stem>``: checkpoints listed in ``Settings.checkpoint_queues`` get their own queue,
  so the workers consuming it keep that checkpoint loaded;
- ``enterprise.<lane>``: tasks of a key granted a dedicated pool (``KeyPolicy.dedicated_lane``) that asked for
  it (``extra.enterprise_plan.enabled``), whatever the model;
- upscale tasks (no checkpoint) go to ``sd15``, which the default workers consume (``upscale_lane``).

The embedded worker ignores lanes (it runs every task), so the same rule serves both modes. Nothing here
imports Celery: the API calls it in embedded mode too.
"""

from __future__ import annotations

import re

from underpaint.config import Settings
from underpaint.registry import ModelEntry

SD15_QUEUE = "sd15"
SDXL_QUEUE = "sdxl"
ENTERPRISE_PREFIX = "enterprise."
DEFAULT_WORKER_QUEUES = (SD15_QUEUE, SDXL_QUEUE)

_QUEUE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,199}$")
_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def slug(name: str) -> str:
    """A name as a queue-name part: lowercase, runs of other characters become ``-``."""
    out = _UNSAFE.sub("-", name.lower()).strip("-")
    if not out:
        raise ValueError(f"{name!r} has no letters or digits to name a queue after")
    return out


def base_queue(checkpoint: ModelEntry) -> str:
    return SDXL_QUEUE if checkpoint.is_sdxl else SD15_QUEUE


def checkpoint_queue(checkpoint: ModelEntry) -> str:
    return f"{base_queue(checkpoint)}.{slug(checkpoint.stem)}"


def enterprise_queue(dedicated_lane: str) -> str:
    return ENTERPRISE_PREFIX + slug(dedicated_lane)


def has_own_queue(settings: Settings, checkpoint: ModelEntry) -> bool:
    return checkpoint.sd_name in settings.checkpoint_queues or checkpoint.stem in settings.checkpoint_queues


def task_lane(settings: Settings, checkpoint: ModelEntry, dedicated_lane: str | None = None) -> str:
    """The lane (= Celery queue) of a task for ``checkpoint``; ``dedicated_lane`` when its enterprise plan applies."""
    if dedicated_lane:
        return enterprise_queue(dedicated_lane)
    if has_own_queue(settings, checkpoint):
        return checkpoint_queue(checkpoint)
    return base_queue(checkpoint)


def upscale_lane(dedicated_lane: str | None = None) -> str:
    """The lane of an upscale task: it loads no checkpoint, so any default worker can run it."""
    return enterprise_queue(dedicated_lane) if dedicated_lane else SD15_QUEUE


def parse_queues(text: str) -> tuple[str, ...]:
    """``"sd15, sdxl"`` -> ``("sd15", "sdxl")``; a clear error for an empty list or a malformed name."""
    names = tuple(dict.fromkeys(q.strip() for q in text.split(",") if q.strip()))
    if not names:
        raise ValueError("no queue given; e.g. --queues sd15,sdxl")
    bad = [q for q in names if not _QUEUE_NAME.match(q)]
    if bad:
        raise ValueError(
            f"invalid queue name(s) {', '.join(map(repr, bad))}: use lowercase letters, digits, '.', '_' and '-' "
            "(e.g. sd15, sdxl, sd15.dreamshaper_8, enterprise.acme)"
        )
    return names


def known_queues(settings: Settings, checkpoints: list[ModelEntry]) -> list[str]:
    """Every queue this configuration can route to (for queue-depth metrics)."""
    queues = list(DEFAULT_WORKER_QUEUES)
    queues += [checkpoint_queue(c) for c in checkpoints if has_own_queue(settings, c)]
    queues += [enterprise_queue(p.dedicated_lane) for p in settings.key_policies.values() if p.dedicated_lane]
    return list(dict.fromkeys(queues))
