"""Out of memory on the GPU: the failed batch's tensors are freed before the one-by-one retry runs, and after the
task fails ``torch.cuda.memory_allocated()`` is back where it was before the task.

The OOM is injected: the UNet call allocates 512 MiB on the device and then raises ``torch.cuda.OutOfMemoryError``,
as a real one does with the step's tensors alive. ``tests/e2e/test_out_of_memory.py`` checks the same control flow
on CPU with weak references.
"""

from __future__ import annotations

import io
import os
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from tests.support.server import make_png

from underpaint.config import Settings
from underpaint.engine import pipeline
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.job import GenerationJob
from underpaint.engine.memory import OutOfMemory
from underpaint.registry import ModelRegistry
from underpaint.vocabulary import SamplerName

pytestmark = pytest.mark.cuda

DEVICE = os.environ.get("UNDERPAINT_CUDA_TEST_DEVICE", "cuda")
BLOCK = 512 << 20  # bytes the failing call holds


def _job(seed: int) -> GenerationJob:
    return GenerationJob(
        checkpoint="tiny-sd15.safetensors",
        init_image=Image.open(io.BytesIO(make_png((128, 128)))).convert("RGB"),
        prompt="a house",
        negative_prompt="",
        width=128,
        height=128,
        image_num=1,
        steps=3,
        guidance_scale=7.0,
        sampler_name=SamplerName("Euler a"),
        seed=seed,
        strength=0.7,
    )


def _allocated() -> int:
    if DEVICE == "cpu":  # scripts/gpu-check --cpu-dry-run: no allocator to read; the weak references still count
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def test_an_oom_leaves_memory_allocated_as_before(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(models_dir=tiny_models_dir, device=DEVICE, dtype="float16", torch_threads=1)
    executor = DiffusersExecutor(settings, ModelRegistry(tiny_models_dir))
    executor.generate_batch([_job(1), _job(2)])  # loads the checkpoint; what stays allocated is the baseline
    before = _allocated()

    held: list[weakref.ref[torch.Tensor]] = []
    at_retry: list[tuple[int, bool]] = []
    builds: list[int] = []
    original = pipeline.build_batch_model_fn

    def build(*args: Any, **kwargs: Any) -> Any:
        fn = original(*args, **kwargs)
        builds.append(1)
        n = len(builds)  # 1: the batch of two; 2: the first job's retry (runs out too); 3: the second job's

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if n == 2 and not at_retry:
                at_retry.append((_allocated(), held[0]() is not None))
            if n <= 2 and len(held) < n:
                step = torch.empty(BLOCK, dtype=torch.uint8, device=x.device)
                held.append(weakref.ref(step))
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return fn(x, t)

        return model_fn

    monkeypatch.setattr(pipeline, "build_batch_model_fn", build)
    outcomes = executor.generate_batch([_job(1), _job(2)])
    monkeypatch.undo()

    assert len(builds) == 3
    assert isinstance(outcomes[0], OutOfMemory)
    assert not isinstance(outcomes[1], BaseException)
    (allocated_at_retry, block_alive_at_retry) = at_retry[0]
    assert not block_alive_at_retry  # the batch's tensors were gone when the retry started
    assert allocated_at_retry - before < BLOCK // 2
    assert all(ref() is None for ref in held)
    assert _allocated() - before < BLOCK // 8  # after the failed task: as before it
    again = executor.generate(_job(1))  # and the executor serves the next task
    assert len(again) == 1
