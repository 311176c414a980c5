"""``compile = true``: the UNet runs under torch.compile, keyed on the shape bucket; a new prompt, LoRA strength or
LoRA of the same layout re-runs the compiled graph instead of compiling again.

Inductor on this 2-core CPU takes minutes per graph, so the test compiles with a counting backend that runs the
captured graph eagerly: dynamo's capture and guards (what decides a recompile) are the same as with inductor.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.config import Settings
from underpaint.demo import adapters as demo
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.job import GenerationJob, LoraSpec
from underpaint.registry import ModelRegistry

pytestmark = pytest.mark.slow


class _CountingBackend:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs += 1
        return gm.forward


@pytest.fixture
def models(tmp_path: Path, tiny_models_dir: Path) -> Path:
    """The tiny models plus a second LoRA with the layout of tiny-detail-sd15 (same layers, same rank)."""
    dest = tmp_path / "models"
    shutil.copytree(tiny_models_dir, dest)
    unet, encoders = demo.meta_models(dest / "checkpoint" / "tiny-sd15.config", sdxl=False)
    demo.save_kohya_lora(
        dest / "lora" / "tiny-twin-sd15.safetensors", demo.lora_layers(unet, encoders, sdxl=False, conv=True, seed=9)
    )
    return dest


@pytest.fixture
def backend() -> Iterator[_CountingBackend]:
    counting = _CountingBackend()  # handed to the executor (``compile_backend``): no module-level switch
    yield counting
    torch._dynamo.reset()


def _job(**kwargs: Any) -> GenerationJob:
    values: dict[str, Any] = {
        "checkpoint": "tiny-sd15.safetensors",
        "init_image": Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)),
        "prompt": "a house",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "image_num": 1,
        "steps": 2,
        "guidance_scale": 7.0,
        "sampler_name": "Euler",
        "seed": 5,
        "strength": 1.0,
        **kwargs,
    }
    return GenerationJob(**values)


def test_compiled_unet_does_not_recompile_for_prompt_or_lora_changes(
    models: Path, backend: _CountingBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(models_dir=models, data_dir=models.parent / "data", torch_threads=1, compile=True)
    executor = DiffusersExecutor(settings, ModelRegistry(models), compile_backend=backend)
    plain = executor.generate(_job())
    assert backend.graphs >= 1
    (slot,) = executor.cache._slots.values()
    assert getattr(slot.value.unet, "_underpaint_compiled", False)

    def graphs_after(job: GenerationJob) -> int:
        executor.generate(job)
        return backend.graphs

    base = backend.graphs
    assert graphs_after(_job(prompt="a (red:1.3) lighthouse at dusk, oil painting")) == base
    detail = (LoraSpec("tiny-detail-sd15.safetensors", 0.8),)
    with_lora = graphs_after(_job(loras=detail))  # hooks go from no terms to one term: new graph(s)
    assert graphs_after(_job(loras=(LoraSpec("tiny-detail-sd15.safetensors", 0.3),))) == with_lora
    assert graphs_after(_job(loras=(LoraSpec("tiny-twin-sd15.safetensors", 0.8),))) == with_lora
    assert graphs_after(_job(loras=detail, prompt="another prompt entirely")) == with_lora
    # Back to no LoRA: the first graph is reused.
    assert graphs_after(_job()) == with_lora
    # The compiled UNet computes what the eager one does.
    eager = DiffusersExecutor(settings.with_overrides(compile=False), ModelRegistry(models)).generate(_job())
    assert plain[0].image.tobytes() == eager[0].image.tobytes()
    # A new shape bucket compiles once more.
    assert graphs_after(_job(width=96)) > with_lora
