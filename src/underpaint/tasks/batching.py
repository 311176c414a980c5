"""Which queued tasks can share one sampler call, and which model a task needs (torch-free; the store uses it).

``batch_key``: tasks with equal keys run as one batch. It covers everything the batch shares: checkpoint, size,
steps, sampler, strength, clip skip, VAE, the LoRA set and strengths, the ControlNet and IP-Adapter
configuration (models, strengths, preprocessors, guidance ranges; not their images, which stay per task) and the
output format. Prompts, negative prompts, embeddings, seeds, ``image_num`` and ``guidance_scale`` may differ.
``None`` means the task never batches: DPM adaptive picks its step sizes from the whole batch, so its images
would depend on their batch mates.

``model_key``: the checkpoint and LoRA set a task loads; a worker prefers queued tasks whose model key is the
one it has loaded (model-aware claiming).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from underpaint.vocabulary import normalize_sampler_name, sampler_algorithm

UNBATCHABLE_SAMPLERS = frozenset({"DPM adaptive"})


def _digest(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _loras(payload: Mapping[str, Any]) -> list[list[Any]]:
    return sorted([str(x["model_name"]), float(x["strength"])] for x in payload.get("loras") or ())


def model_key(payload: Mapping[str, Any]) -> str | None:
    """Checkpoint plus LoRA set (names and strengths) of a stored task payload; None if it names no checkpoint."""
    try:
        return _digest({"checkpoint": payload["model_name"], "loras": _loras(payload)})
    except (KeyError, TypeError, ValueError):
        return None


def batch_key(payload: Mapping[str, Any], response_image_type: str) -> str | None:
    """The key of tasks that can share a sampler call (see the module docstring), or None (never batched; also
    for a payload that lacks a field the key needs)."""
    try:
        return _batch_key(payload, response_image_type)
    except (KeyError, TypeError, ValueError):
        return None


def _batch_key(payload: Mapping[str, Any], response_image_type: str) -> str | None:
    sampler = normalize_sampler_name(str(payload.get("sampler_name", "")))
    if sampler is None or sampler_algorithm(sampler) in UNBATCHABLE_SAMPLERS:
        return None
    controlnet = payload.get("controlnet") or {}
    units = [
        [
            str(u["model_name"]),
            float(u["strength"]),
            u.get("preprocessor") or "none",
            float(u["guidance_start"]),
            float(u["guidance_end"]),
        ]
        for u in controlnet.get("units") or ()
    ]
    adapters = [[str(a["model_name"]), float(a["strength"])] for a in payload.get("ip_adapters") or ()]
    return _digest(
        {
            "checkpoint": payload["model_name"],
            "width": int(payload["width"]),
            "height": int(payload["height"]),
            "steps": int(payload["steps"]),
            "sampler": sampler,
            "strength": float(payload["strength"]),
            "clip_skip": int(payload.get("clip_skip") or 1),
            "vae": payload.get("sd_vae") or None,
            "loras": _loras(payload),
            "controlnet": units,
            "ip_adapters": adapters,
            "format": response_image_type,
        }
    )
