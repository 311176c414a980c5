"""Cross-request batching in the engine: ``Executor.generate_batch`` against the same jobs run alone.

Tiny demo checkpoints on CPU. A batched job's images must equal its solo run within 1 level (max) and 0.02 (mean)
on every sampler but DPM adaptive; the batch mixes prompts of different token lengths (so some members run the two
halves of guidance as separate UNet calls), guidance scales (1 skips the unconditional half), image_num and seeds.

Every sampler is compared in float64, where batched and solo runs are bit-identical: any difference there is a
semantic one (a wrong noise stream, guidance, conditioning or control map). In float32 the UNet's kernels round
differently at different batch sizes; the tiny random-weight models amplify that on some schedules (Karras) to
2-5 levels on a few pixels, exactly as an ``image_num=3`` job already differs from three ``image_num=1`` jobs
(checked below), so the float32 comparison covers the samplers where the tiny models stay within 1 level (max).
How many pixels move by that 1 level depends on the CPU's kernels (AVX-512 here: mean 0.048 for DPM++ SDE, 0.023
for UniPC), so float32 allows a mean of 0.1; a semantic error (another seed, prompt or guidance) moves most pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.config import Settings
from underpaint.engine import pipeline
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.job import (
    ControlNetUnitSpec,
    EmbeddingSpec,
    GeneratedImage,
    GenerationJob,
    IPAdapterSpec,
    JobCancelled,
    JobError,
    JobOutcome,
    Progress,
)
from underpaint.engine.samplers import sample_img2img
from underpaint.registry import ModelRegistry
from underpaint.vocabulary import SAMPLER_NAMES, PreprocessorName, SamplerName

SIZE = 64
LONG_PROMPT = ", ".join(f"detail {i} of a very ornate baroque cathedral interior" for i in range(14))  # > 75 tokens


@pytest.fixture(scope="module")
def executor(tiny_models_dir: Path) -> DiffusersExecutor:
    return DiffusersExecutor(Settings(models_dir=tiny_models_dir, torch_threads=1), ModelRegistry(tiny_models_dir))


@pytest.fixture(scope="module")
def executor64(tiny_models_dir: Path) -> DiffusersExecutor:
    settings = Settings(models_dir=tiny_models_dir, torch_threads=1)
    return DiffusersExecutor(settings, ModelRegistry(tiny_models_dir), dtype=torch.float64)


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def job(**kw: Any) -> GenerationJob:
    base = GenerationJob(
        checkpoint="tiny-sd15.safetensors",
        init_image=picture(1),
        prompt="a red house",
        negative_prompt="blurry",
        width=SIZE,
        height=SIZE,
        image_num=1,
        steps=6,
        guidance_scale=7.0,
        sampler_name=SamplerName("Euler a"),
        seed=100,
        strength=0.75,
    )
    return replace(base, **kw)


def mixed_jobs(sampler: str, checkpoint: str = "tiny-sd15.safetensors") -> list[GenerationJob]:
    """Compatible jobs that differ in everything a batch lets differ."""
    common = {"sampler_name": sampler, "checkpoint": checkpoint}
    return [
        job(seed=100, prompt="a red house", negative_prompt="blurry", **common),
        # prompt of two 77-token chunks against a one-chunk negative: guidance as two UNet calls
        job(seed=7, prompt=LONG_PROMPT, init_image=picture(2), image_num=2, guidance_scale=4.5, **common),
        job(seed=2**32 - 1, prompt="a blue boat", negative_prompt="", guidance_scale=1.0, **common),
    ]


def pixels(images: JobOutcome) -> list[np.ndarray]:
    assert not isinstance(images, BaseException), images
    return [np.asarray(g.image).astype(np.int16) for g in images]


def assert_same(batched: JobOutcome, solo: list[GeneratedImage], mean_tol: float = 0.02) -> None:
    a, b = pixels(batched), pixels(solo)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        diff = np.abs(x - y)
        assert diff.max() <= 1, f"max difference {diff.max()}"
        assert diff.mean() <= mean_tol, f"mean difference {diff.mean()}"


BATCHABLE = [s for s in SAMPLER_NAMES if s != "DPM adaptive"]


@pytest.mark.parametrize("sampler", BATCHABLE)
def test_batched_jobs_equal_their_solo_runs(executor64: DiffusersExecutor, sampler: str) -> None:
    jobs = mixed_jobs(sampler)
    batched = executor64.generate_batch(jobs)
    for j, out in zip(jobs, batched, strict=True):
        solo = executor64.generate(j)
        assert_same(out, solo)
        np.testing.assert_array_equal(pixels(out), pixels(solo))
    # Each job kept its own seeds (image i of a job: seed + i, wrapping at 2**32) and its own infotext.
    assert not isinstance(batched[2], BaseException)
    assert not isinstance(batched[1], BaseException)
    assert [g.seed for g in batched[1]] == [7, 8]
    assert batched[2][0].seed == 2**32 - 1
    assert "blue boat" in batched[2][0].infotext


FLOAT32_MEAN_TOL = 0.1  # see the module docstring: the share of 1-level pixels depends on the CPU's kernels


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE", "DPM2 a", "DDIM", "UniPC", "PLMS", "DPM fast"])
def test_batched_jobs_equal_their_solo_runs_in_float32(executor: DiffusersExecutor, sampler: str) -> None:
    jobs = mixed_jobs(sampler)
    for j, out in zip(jobs, executor.generate_batch(jobs), strict=True):
        assert_same(out, executor.generate(j), mean_tol=FLOAT32_MEAN_TOL)


def test_float32_rounding_across_batch_sizes_is_that_of_image_num(executor: DiffusersExecutor) -> None:
    """Where the tiny model amplifies float32 rounding (LMS Karras), a batch mate differs from its solo run
    exactly as the first image of an ``image_num=3`` job differs from the same seed alone."""
    head = mixed_jobs("LMS Karras")[0]
    solo = pixels(executor.generate(head))[0]
    as_image_num = pixels(executor.generate(replace(head, image_num=3)))[0]
    batched = pixels(executor.generate_batch([head, replace(head, seed=5, image_num=2)])[0])[0]
    np.testing.assert_array_equal(batched, as_image_num)
    assert np.abs(batched - solo).max() <= 8  # measured 3 on the earlier CI machine, 5 on this AVX-512 one


def test_batch_runs_one_sampler_call(executor: DiffusersExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = sample_img2img

    def counting(*args: Any, **kw: Any) -> torch.Tensor:
        calls.append(int(args[3].shape[0]))
        out: torch.Tensor = real(*args, **kw)
        return out

    monkeypatch.setattr(pipeline, "sample_img2img", counting)
    executor.generate_batch(mixed_jobs("DPM++ 2M"))
    assert calls == [4]  # 1 + 2 + 1 images in one call


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sdxl_batch_equals_solo(executor: DiffusersExecutor, executor64: DiffusersExecutor, dtype: str) -> None:
    ex = executor64 if dtype == "float64" else executor
    jobs = mixed_jobs("DPM++ 2S a", checkpoint="tiny-sdxl.safetensors")
    for j, out in zip(jobs, ex.generate_batch(jobs), strict=True):
        assert_same(out, ex.generate(j))


def test_dpm_adaptive_jobs_run_alone_and_equal_their_solo_runs(
    executor: DiffusersExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = sample_img2img

    def counting(*args: Any, **kw: Any) -> torch.Tensor:
        calls.append(int(args[3].shape[0]))
        out: torch.Tensor = real(*args, **kw)
        return out

    monkeypatch.setattr(pipeline, "sample_img2img", counting)
    jobs = mixed_jobs("DPM adaptive")
    batched = executor.generate_batch(jobs)
    assert calls == [1, 2, 1]
    for j, out in zip(jobs, batched, strict=True):
        np.testing.assert_array_equal(pixels(out), pixels(executor.generate(j)))


def test_incompatible_jobs_are_split_into_compatible_groups(executor: DiffusersExecutor) -> None:
    jobs = [job(seed=1), job(seed=2, steps=5), job(seed=3, checkpoint="tiny-sdxl.safetensors"), job(seed=4)]
    batched = executor.generate_batch(jobs)
    for j, out in zip(jobs, batched, strict=True):
        assert_same(out, executor.generate(j))


def test_controlnet_maps_stay_per_job(executor64: DiffusersExecutor) -> None:
    executor = executor64

    def square(lo: int, hi: int) -> Image.Image:
        arr = np.zeros((SIZE, SIZE, 3), np.uint8)
        arr[lo:hi, lo:hi] = 255
        return Image.fromarray(arr)

    def unit(image: Image.Image) -> tuple[ControlNetUnitSpec, ...]:
        return (
            ControlNetUnitSpec(
                model="control_v11p_sd15_canny", image=image, strength=1.0, preprocessor=PreprocessorName("canny")
            ),
        )

    jobs = [
        job(seed=1, controlnets=unit(square(16, 48)), sampler_name="Euler"),
        job(seed=2, controlnets=unit(square(4, 20)), prompt=LONG_PROMPT, image_num=2, sampler_name="Euler"),
    ]
    batched = executor.generate_batch(jobs)
    for j, out in zip(jobs, batched, strict=True):
        assert_same(out, executor.generate(j))
    # The maps matter: the same job with the other map gives another picture.
    other = executor.generate(replace(jobs[0], controlnets=jobs[1].controlnets))
    assert np.abs(pixels(batched[0])[0] - pixels(other)[0]).mean() > 0.5


def test_ip_adapter_embeddings_stay_per_job(executor64: DiffusersExecutor) -> None:
    executor = executor64

    def adapter(seed: int) -> tuple[IPAdapterSpec, ...]:
        return (IPAdapterSpec(model="ip-adapter_sd15.bin", image=picture(seed), strength=1.0),)

    jobs = [job(seed=1, ip_adapters=adapter(10)), job(seed=2, ip_adapters=adapter(11), guidance_scale=1.0)]
    batched = executor.generate_batch(jobs)
    for j, out in zip(jobs, batched, strict=True):
        assert_same(out, executor.generate(j))


# -- failure isolation, progress, cancellation -------------------------------------------------------------------


def test_a_job_failing_in_preparation_never_fails_its_mates(executor: DiffusersExecutor) -> None:
    bad_embedding = job(seed=2, embeddings=(EmbeddingSpec("no-such-embedding.pt"),))
    bad_preprocessor = job(
        seed=3,
        controlnets=(
            ControlNetUnitSpec(
                "control_v11p_sd15_canny", picture(3), preprocessor=PreprocessorName("no-such-preprocessor")
            ),
        ),
    )
    good = [job(seed=1), job(seed=4, prompt="a green tree")]
    outcomes = executor.generate_batch([good[0], bad_embedding, good[1]])
    assert isinstance(outcomes[1], JobError)
    for j, out in zip(good, (outcomes[0], outcomes[2]), strict=True):
        assert_same(out, executor.generate(j))
    # Different batch key (ControlNet config), same call: the bad one fails alone.
    outcomes = executor.generate_batch([bad_preprocessor, good[0]])
    assert isinstance(outcomes[0], Exception)
    assert_same(outcomes[1], executor.generate(good[0]))


def test_a_failing_batch_is_retried_job_by_job(executor: DiffusersExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory in the shared call (any failure of it) never wedges the batch: each job runs alone."""
    real = pipeline._sample
    sizes: list[int] = []

    def oom_when_batched(c: Any, spec: Any, batch: Any) -> torch.Tensor:
        sizes.append(len(batch.members))
        if len(batch.members) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        out: torch.Tensor = real(c, spec, batch)
        return out

    monkeypatch.setattr(pipeline, "_sample", oom_when_batched)
    jobs = mixed_jobs("Euler a")
    outcomes = executor.generate_batch(jobs)
    assert sizes == [3, 1, 1, 1]
    monkeypatch.setattr(pipeline, "_sample", real)
    for j, out in zip(jobs, outcomes, strict=True):
        assert_same(out, executor.generate(j))


def test_each_job_gets_its_own_progress(executor: DiffusersExecutor) -> None:
    seen: list[list[float]] = [[], [], []]

    def recorder(i: int) -> Callable[[Progress], None]:
        return lambda p: seen[i].append(p.fraction)

    executor.generate_batch(mixed_jobs("Heun"), on_progress=[recorder(0), recorder(1), recorder(2)])
    for fractions in seen:
        assert fractions, "no progress reported"
        assert fractions == sorted(fractions)
        assert 0 < fractions[-1] <= 0.99
    assert seen[0] == seen[1] == seen[2]


FLOAT32_MEAN_TOL = 0.1  # see the module docstring: the share of 1-level pixels depends on the CPU's kernels


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE", "LMS", "UniPC"])
def test_a_cancelled_job_drops_out_without_disturbing_the_others(executor: DiffusersExecutor, sampler: str) -> None:
    jobs = mixed_jobs(sampler)
    polls = 0

    def cancel_second() -> bool:
        nonlocal polls
        polls += 1
        return polls > 2  # cancelled after two model evaluations

    third_polls = 0

    def never() -> bool:
        nonlocal third_polls
        third_polls += 1
        return False

    outcomes = executor.generate_batch(jobs, should_cancel=[None, cancel_second, never])
    assert isinstance(outcomes[1], JobCancelled)
    # The batch shrinks mid-run, so the remaining jobs run through kernels of another shape than their solo runs:
    # the share of 1-level pixels depends on the CPU (0.027 for UniPC on an AMD EPYC), the maximum does not.
    assert_same(outcomes[0], executor.generate(jobs[0]), mean_tol=FLOAT32_MEAN_TOL)
    assert_same(outcomes[2], executor.generate(jobs[2]), mean_tol=FLOAT32_MEAN_TOL)
    assert polls == 3  # not asked again once it dropped out
    assert third_polls > polls  # the others went on sampling


def test_a_progress_callback_that_raises_stops_only_its_job(executor: DiffusersExecutor) -> None:
    jobs = mixed_jobs("Euler")

    def lost(_p: Progress) -> None:
        raise JobCancelled("this worker lost its lease")

    outcomes = executor.generate_batch(jobs, on_progress=[None, None, lost])
    assert isinstance(outcomes[2], JobCancelled)
    assert_same(outcomes[0], executor.generate(jobs[0]))
    assert_same(outcomes[1], executor.generate(jobs[1]))


def test_every_job_cancelled_ends_the_call(executor: DiffusersExecutor) -> None:
    outcomes = executor.generate_batch(mixed_jobs("Euler")[:2], should_cancel=[lambda: True, lambda: True])
    assert all(isinstance(o, JobCancelled) for o in outcomes)
    with pytest.raises(JobCancelled):
        executor.generate(job(), should_cancel=lambda: True)


# -- the worker path: store -> claim a batch -> GenerationRunner.run_batch -> stored images ----------------------


def test_worker_batch_end_to_end_with_a_bad_input_failing_alone(
    executor: DiffusersExecutor, tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64
    import io

    from tests.support.requests import img2img

    from underpaint.tasks.contract import Img2ImgRequest
    from underpaint.tasks.types import NewTask, TaskStatus
    from underpaint.wiring import build_core
    from underpaint.worker.jobs import job_from_request
    from underpaint.worker.loop import BatchPolicy, Worker
    from underpaint.worker.runner import GenerationRunner

    models = tmp_path / "models"
    models.mkdir()
    for sub in tiny_models_dir.iterdir():
        (models / sub.name).symlink_to(sub, target_is_directory=sub.is_dir())
    settings = Settings(data_dir=tmp_path / "data", models_dir=models, torch_threads=1, run_worker=False)
    core = build_core(settings)
    services = core.services

    def png(seed: int) -> str:
        buf = io.BytesIO()
        picture(seed).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    def request(i: int, image: str) -> Img2ImgRequest:
        return img2img(
            model_name="tiny-sd15.safetensors", image_base64=image, prompt=[LONG_PROMPT, "a cat", "a dog"][i % 3],
            width=SIZE, height=SIZE, image_num=1 + i % 2, steps=6, guidance_scale=7.0 - i, seed=50 + i,
            strength=0.75,
        )  # fmt: skip

    requests = [request(0, png(0)), request(1, "bm90IGFuIGltYWdl"), request(2, png(2)), request(3, png(3))]
    ids = []
    for i, r in enumerate(requests):
        ids.append(f"task-{i}")
        services.store.create(NewTask(task_id=ids[-1], owner="o", request=r))
    batches: list[int] = []
    real = executor.generate_batch

    def spy(jobs: Any, *a: Any, **kw: Any) -> list[JobOutcome]:
        batches.append(len(jobs))
        out: list[JobOutcome] = real(jobs, *a, **kw)
        return out

    monkeypatch.setattr(executor, "generate_batch", spy)
    runner = GenerationRunner(settings, services.storage, executor)
    worker = Worker(services.store, runner, settings, worker_id="w", policy=BatchPolicy(4, 0.0, 30.0))
    assert worker.run_once()
    assert batches == [3]  # the bad payload failed before the engine; the others shared one call
    bad = services.store.get(ids[1])
    assert bad is not None
    assert bad.status is TaskStatus.FAILED
    assert "image_base64" in bad.reason
    monkeypatch.setattr(executor, "generate_batch", real)
    for i in (0, 2, 3):
        record = services.store.get(ids[i])
        assert record is not None
        assert record.status is TaskStatus.SUCCEED, record.reason
        assert record.progress_percent == 100
        stored = [Image.open(io.BytesIO(services.storage.get(img.key))).convert("RGB") for img in record.images]
        solo = executor.generate(job_from_request(requests[i]))
        assert_same([GeneratedImage(im, 0, "") for im in stored], solo)
