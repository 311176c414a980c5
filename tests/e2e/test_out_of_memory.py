"""A CUDA out-of-memory error fails that task with a clear reason; the worker then serves the next task.

Injected on CPU: the UNet raises ``torch.cuda.OutOfMemoryError`` (the class exists without CUDA) on its next call.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from tests.support.server import make_png

from underpaint.api.app import create_app
from underpaint.config import Settings
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.job import ControlNetUnitSpec, GenerationJob, LoraSpec
from underpaint.engine.memory import OutOfMemory
from underpaint.vocabulary import PreprocessorName
from underpaint.wiring import build_core, build_local_worker
from underpaint.worker.loop import Worker
from underpaint.worker.runner import GenerationRunner

A = {"Authorization": "Bearer key-a"}


class _Stack:
    def __init__(self, client: TestClient, worker: Worker, executor: DiffusersExecutor) -> None:
        self.client, self.worker, self.executor = client, worker, executor

    def submit(self, **extra: Any) -> str:
        request = {
            "model_name": "tiny-sd15.safetensors",
            "image_base64": base64.b64encode(make_png()).decode(),
            "prompt": "a house",
            "width": 128,
            "height": 128,
            "image_num": 2,
            "steps": 3,
            "seed": 1,
            "sampler_name": "Euler a",
            "strength": 0.7,
            **extra,
        }
        r = self.client.post("/v3/async/img2img", json={"extra": {}, "request": request}, headers=A)
        assert r.status_code == 200, r.text
        return str(r.json()["task_id"])

    def task(self, task_id: str) -> dict[str, Any]:
        r = self.client.get("/v3/async/task-result", params={"task_id": task_id}, headers=A)
        return dict(r.json()["task"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[_Stack]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data"),
        models_dir=tiny_models_dir,
        api_keys=("key-a",),
        torch_threads=1,
        run_worker=False,
        public_base_url="http://testserver",
    )
    core = build_core(settings)
    executor = DiffusersExecutor(settings, core.services.registry)
    worker = build_local_worker(core, GenerationRunner(settings, core.services.storage, executor))
    with TestClient(create_app(core.services)) as client:
        yield _Stack(client, worker, executor)


def _fail_next_unet_call(executor: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the checkpoint's UNet raise one CUDA OOM; returns a list that counts UNet calls."""
    from underpaint.engine import pipeline

    calls: list[int] = []
    original = pipeline.build_batch_model_fn

    def build(*args: Any, **kwargs: Any) -> Any:
        fn = original(*args, **kwargs)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            if len(calls) == 2:  # mid-sampling, with the step's tensors alive
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return fn(x, t)

        return model_fn

    monkeypatch.setattr(pipeline, "build_batch_model_fn", build)
    return calls


def _job(**kwargs: Any) -> GenerationJob:
    values: dict[str, Any] = {
        "checkpoint": "tiny-sd15.safetensors",
        "init_image": Image.open(__import__("io").BytesIO(make_png())).convert("RGB"),
        "prompt": "a house",
        "negative_prompt": "",
        "width": 128,
        "height": 128,
        "image_num": 3,
        "steps": 3,
        "guidance_scale": 7.0,
        "sampler_name": "Euler a",
        "seed": 5,
        "strength": 0.7,
        **kwargs,
    }
    return GenerationJob(**values)


def test_oom_in_thread_is_a_job_error_and_the_next_job_runs(stack: _Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    executor = stack.executor
    lora = (LoraSpec("tiny-detail-sd15.safetensors", 0.8),)
    reference = executor.generate(_job(loras=lora))
    calls = _fail_next_unet_call(executor, monkeypatch)
    with pytest.raises(OutOfMemory) as info:
        executor.generate(_job(loras=lora))
    assert str(info.value).startswith("out of GPU memory at 128x128, image_num 3; try fewer images or a smaller size")
    assert info.value.__context__ is None  # the OOM's traceback (and the tensors it holds) is gone
    (slot,) = executor.cache._slots.values()
    assert executor.loras.hooked_layers(slot.value) == []  # per-task adapters dropped
    monkeypatch.undo()
    again = executor.generate(_job(loras=lora))  # same executor, same cached checkpoint
    assert len(calls) == 2
    assert [a.image.tobytes() == b.image.tobytes() for a, b in zip(reference, again, strict=True)] == [True] * 3


def test_oom_through_the_worker_loop_fails_that_task_only(stack: _Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    doomed = stack.submit(image_num=4, width=192)
    _fail_next_unet_call(stack.executor, monkeypatch)
    assert stack.worker.run_once()
    task = stack.task(doomed)
    assert task["status"] == "TASK_STATUS_FAILED"
    assert task["reason"].startswith("out of GPU memory at 192x128, image_num 4; try fewer images or a smaller size")
    monkeypatch.undo()
    fine = stack.submit()
    assert stack.worker.run_once()
    assert stack.task(fine)["status"] == "TASK_STATUS_SUCCEED"


def test_oom_through_the_running_worker_thread(stack: _Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's own loop (``start``): it survives the OOM and picks up the next task."""
    import time

    doomed = stack.submit()
    _fail_next_unet_call(stack.executor, monkeypatch)
    stack.worker.start()
    try:
        deadline = time.monotonic() + 120
        while stack.task(doomed)["status"] not in ("TASK_STATUS_FAILED", "TASK_STATUS_SUCCEED"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stack.task(doomed)["status"] == "TASK_STATUS_FAILED"
        monkeypatch.undo()
        fine = stack.submit()
        while stack.task(fine)["status"] not in ("TASK_STATUS_FAILED", "TASK_STATUS_SUCCEED"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stack.task(fine)["status"] == "TASK_STATUS_SUCCEED"
        assert stack.worker.running
    finally:
        stack.worker.stop()


def test_recovery_runs_after_the_failed_batch_tensors_are_freed(stack: _Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control flow the GPU test (``tests/cuda/test_oom_memory.py``) measures with ``memory_allocated``, on CPU:
    a tensor alive in a failing UNet call is gone before the one-by-one retry runs and before the allocator's cache
    is emptied."""
    import weakref

    from underpaint.engine import executor as executor_module
    from underpaint.engine import pipeline

    held: list[weakref.ref[torch.Tensor]] = []  # one per failed sampler call
    alive_at_retry: list[bool] = []
    alive_at_free: list[bool] = []
    original = pipeline.build_batch_model_fn
    builds: list[int] = []

    def build(*args: Any, **kwargs: Any) -> Any:
        fn = original(*args, **kwargs)
        builds.append(1)
        n = len(builds)  # 1: the batch of two; 2: the first job's retry (fails too); 3: the second job's retry

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            activations = torch.ones(1 << 20)  # what the call had allocated when it ran out
            if n == 2 and len(held) == 1:
                alive_at_retry.append(held[0]() is not None)
            if n <= 2 and len(held) < n:
                held.append(weakref.ref(activations))
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return fn(x, t)

        return model_fn

    def free() -> None:
        alive_at_free.extend(ref() is not None for ref in held)

    monkeypatch.setattr(pipeline, "build_batch_model_fn", build)
    monkeypatch.setattr(executor_module, "free_device_memory", free)
    jobs = [_job(image_num=1, seed=5), _job(image_num=1, seed=9)]  # compatible: one sampler call
    outcomes = stack.executor.generate_batch(jobs)
    assert len(builds) == 3
    assert alive_at_retry == [False]
    assert alive_at_free == [False, False]
    assert isinstance(outcomes[0], OutOfMemory)  # the first job ran out again on its own: a task failure
    assert not isinstance(outcomes[1], BaseException)  # its mate, retried on its own, has its image


def _oom(*_args: Any, **_kwargs: Any) -> Any:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")


DIFFUSERS_CONTROLNET = "control_v11p_sd15_canny_diffusers"  # a folder: diffusers' from_pretrained loads it


@pytest.mark.parametrize("where", ["lora", "controlnet", "annotator"])
def test_oom_while_loading_an_adapter_is_out_of_memory_not_a_broken_file(
    stack: _Stack, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The loaders turn a file that does not load into a client error naming it; an out-of-memory error raised in
    the same call is not that: it reaches the executor's out-of-memory handling (and its clean-up) instead."""
    from diffusers.models.controlnets.controlnet import ControlNetModel

    from underpaint.engine.adapters import lora
    from underpaint.engine.preprocessors import networks

    hed = PreprocessorName("softedge_hed")
    unit = ControlNetUnitSpec(model="control_v11p_sd15_openpose", image=Image.new("RGB", (128, 128)), preprocessor=hed)
    job = {
        "lora": _job(image_num=1, loras=(LoraSpec("tiny-style-sd15.safetensors", 0.7),)),
        "controlnet": _job(image_num=1, controlnets=(replace(unit, model=DIFFUSERS_CONTROLNET, preprocessor=None),)),
        "annotator": _job(image_num=1, controlnets=(unit,)),
    }[where]
    target = {
        "lora": (lora, "convert_lora"),
        "controlnet": (ControlNetModel, "from_pretrained"),
        "annotator": (networks, "load_state"),
    }[where]
    monkeypatch.setattr(*target, _oom)
    (outcome,) = stack.executor.generate_batch([job])
    assert isinstance(outcome, OutOfMemory), repr(outcome)
    assert str(outcome).startswith("out of GPU memory at 128x128, image_num 1")
    monkeypatch.undo()
    (again,) = stack.executor.generate_batch([job])  # nothing half-loaded stays behind
    assert not isinstance(again, BaseException), repr(again)
