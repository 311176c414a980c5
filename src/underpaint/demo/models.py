"""``underpaint demo-models DIR``: every tiny demo model, in the real on-disk formats."""

from __future__ import annotations

from pathlib import Path

from underpaint.demo.adapters import write_demo_adapters
from underpaint.demo.checkpoints import write_demo_models
from underpaint.demo.controlnet import write_demo_controlnets
from underpaint.demo.upscalers import write_demo_upscalers


def write_all_demo_models(models_dir: Path) -> dict[str, Path]:
    """Everything ``underpaint demo-models DIR`` writes: checkpoints, VAE, LoRAs, embeddings, IP-Adapters,
    ControlNets, annotators and upscalers."""
    written = write_demo_models(models_dir)
    ckpt = Path(models_dir) / "checkpoint"
    for path in write_demo_adapters(Path(models_dir), ckpt / "tiny-sd15.config", ckpt / "tiny-sdxl.config"):
        written[f"{path.parent.name}/{path.name}"] = path
    written.update(write_demo_controlnets(models_dir))
    written.update(write_demo_upscalers(models_dir))
    return written
