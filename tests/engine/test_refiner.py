"""The SDXL refiner (A1111 >= 1.7): the model switches once the completed ratio, ``(999 - t) / 1000`` for the training
timestep t nearest in sigma to the current noise level, reaches ``switch_at``; from then on the refiner runs, on
its own text encoder's conditioning (OpenCLIP-G alone) and its aesthetic-score size conditioning.

References: k-diffusion's sigma table and sampler for the switching point (a switching model written here from
A1111's rule), diffusers' ``StableDiffusionXLImg2ImgPipeline`` (``encode_prompt``, ``_get_add_time_ids`` with
``requires_aesthetics_score``) for the refiner's conditioning.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.support.adapter_pipes import load
from tests.support.samplers import (
    SCHEDULE,
    SEEDS,
    CountingModel,
    kdiffusion,
    reference_txt2img,
    rel_err,
    toy_model,
)
from torch import Tensor

from underpaint.config import Settings
from underpaint.engine.conditioning import TextEncoderBundle, encode_prompt
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.job import GenerationJob, HiresFix, JobError, Refiner
from underpaint.engine.pipeline import completed_ratio, switching_model_fn
from underpaint.engine.samplers import NoiseSource, sample_txt2img
from underpaint.registry import ModelRegistry
from underpaint.vocabulary import SamplerName


def a1111_ratio(sigma: float) -> float:
    """A1111 >= 1.7 ``apply_refiner``: argmin |model sigmas - sigma| over k-diffusion's table, (999 - t) / 1000."""
    _, external = kdiffusion()

    class Inner:
        alphas_cumprod = SCHEDULE.alphas_cumprod

    sigmas = external.CompVisDenoiser(Inner()).sigmas
    return (999 - int(torch.argmin((sigmas - sigma).abs()))) / 1000


def test_completed_ratio_is_a1111s() -> None:
    for sigma in (14.6, 9.0, 3.3, 1.0, 0.42, 0.1, 0.0292):
        t = torch.tensor([SCHEDULE.sigma_to_t(sigma)], dtype=torch.float64)
        assert completed_ratio(SCHEDULE, t) == pytest.approx(a1111_ratio(sigma), abs=1e-6), sigma
    # DDIM / PLMS hand the UNet whole timesteps: the ratio of that timestep itself.
    assert completed_ratio(SCHEDULE, torch.tensor([951.0])) == pytest.approx(0.048)
    assert completed_ratio(SCHEDULE, torch.tensor([1.0])) == pytest.approx(0.998)


def refined_toy() -> Any:
    base = toy_model(SCHEDULE)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return 0.7 * base(x, t) + 0.1 * torch.cos(x)

    return fn


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M Karras", "Heun"])
@pytest.mark.parametrize("switch_at", [0.0, 0.3, 0.8, 1.0])
def test_the_switch_happens_where_a1111_switches(name: str, switch_at: float) -> None:
    base, refined = CountingModel(toy_model(SCHEDULE)), CountingModel(refined_toy())
    shape = (2, 4, 8, 8)
    ours = sample_txt2img(
        SamplerName(name),
        switching_model_fn(base, refined, SCHEDULE, switch_at),
        SCHEDULE,
        shape,
        10,
        NoiseSource(SEEDS),
        dtype=torch.float64,
    )
    # The reference: k-diffusion's sampler over a model that switches by A1111's rule, checked per evaluation.
    state = {"switched": False, "base_calls": 0}

    def reference_model(x: Tensor, t: Tensor) -> Tensor:
        sigma = SCHEDULE.t_to_sigma(float(t.max()))
        state["switched"] = state["switched"] or a1111_ratio(sigma) >= switch_at
        if not state["switched"]:
            state["base_calls"] += 1
            return toy_model(SCHEDULE)(x, t)
        out: Tensor = refined_toy()(x, t)
        return out

    ref, _ = reference_txt2img(name, reference_model, shape, 10, SEEDS)
    assert base.calls == state["base_calls"]
    assert rel_err(ours, ref) <= 1e-10
    if switch_at == 0.0:
        assert base.calls == 0
    if switch_at == 1.0:
        assert refined.calls == 0  # the ratio never reaches 1: A1111 never switches


@pytest.fixture(scope="module")
def executor(tiny_models_dir: Path) -> DiffusersExecutor:
    return DiffusersExecutor(Settings(models_dir=tiny_models_dir, torch_threads=1), ModelRegistry(tiny_models_dir))


def sdxl_job(**extra: Any) -> GenerationJob:
    base = GenerationJob(
        checkpoint="tiny-sdxl",
        init_image=None,
        prompt="a castle on a hill",
        negative_prompt="ugly",
        width=64,
        height=64,
        image_num=1,
        steps=6,
        guidance_scale=6.0,
        sampler_name=SamplerName("DPM++ 2M"),
        seed=5,
        strength=1.0,
    )
    return replace(base, **extra)


def test_refiner_conditioning_matches_diffusers(tiny_models_dir: Path) -> None:
    """The refiner's prompt encoding (OpenCLIP-G penultimate layer, pooled at EOS through the projection) equals
    diffusers' ``StableDiffusionXLImg2ImgPipeline.encode_prompt`` on the same refiner file."""
    loaded = load(tiny_models_dir, "tiny-sdxl-refiner.safetensors")
    assert loaded.is_refiner
    assert loaded.pipe.text_encoder is None
    bundle = TextEncoderBundle(list(loaded.tokenizers), list(loaded.text_encoders), True, refiner=True)
    pipe: Any = loaded.pipe
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        "a castle on a hill", device=torch.device("cpu"), do_classifier_free_guidance=True, negative_prompt="ugly"
    )
    ours, ours_neg = encode_prompt(bundle, "a castle on a hill"), encode_prompt(bundle, "ugly")
    for a, b in ((ours.embeds, embeds), (ours.pooled, pooled), (ours_neg.embeds, neg), (ours_neg.pooled, neg_pooled)):
        assert a is not None
        torch.testing.assert_close(a, b)


def test_refiner_runs_on_its_aesthetic_score_conditioning(executor: DiffusersExecutor, tiny_models_dir: Path) -> None:
    """The refiner UNet gets diffusers' refiner time ids: (original size, crop top-left, aesthetic score 6 for the
    prompt, 2.5 for the negative prompt), and the base UNet its own six ids."""
    refiner = executor.cache.get(executor._entry("checkpoint", "tiny-sdxl-refiner"))
    seen: list[Tensor] = []

    def record(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].detach().clone())

    handle = refiner.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        executor.generate(sdxl_job(refiner=Refiner("tiny-sdxl-refiner", 0.5)))
    finally:
        handle.remove()
    assert seen
    pipe: Any = load(tiny_models_dir, "tiny-sdxl-refiner.safetensors").pipe
    pos, neg = pipe._get_add_time_ids(
        (64, 64), (0, 0), (64, 64), 6.0, 2.5, (64, 64), (0, 0), (64, 64), torch.float32, 64
    )
    rows = {tuple(r.tolist()) for ids in seen for r in ids}
    assert rows == {tuple(pos[0].tolist()), tuple(neg[0].tolist())}


def test_switch_at_one_is_the_base_alone_and_lower_values_refine(executor: DiffusersExecutor) -> None:
    plain = np.asarray(executor.generate(sdxl_job())[0].image)
    never = executor.generate(sdxl_job(refiner=Refiner("tiny-sdxl-refiner", 1.0)))[0]
    np.testing.assert_array_equal(np.asarray(never.image), plain)
    refined = executor.generate(sdxl_job(refiner=Refiner("tiny-sdxl-refiner", 0.6)))[0]
    assert np.abs(np.asarray(refined.image, dtype=np.int16) - plain).max() > 1
    params = refined.infotext.splitlines()[-1]
    assert "Refiner: tiny-sdxl-refiner [" in params
    assert "Refiner switch at: 0.6" in params


def test_with_a_hires_fix_the_refiner_joins_the_second_pass_only(executor: DiffusersExecutor) -> None:
    """A1111's default ("second pass"): the first pass is the base's alone, whatever ``switch_at`` says."""
    refiner = executor.cache.get(executor._entry("checkpoint", "tiny-sdxl-refiner"))
    sizes: list[tuple[int, ...]] = []
    handle = refiner.unet.register_forward_pre_hook(lambda _m, args: sizes.append(tuple(args[0].shape[-2:])))
    try:
        out = executor.generate(sdxl_job(refiner=Refiner("tiny-sdxl-refiner", 0.0), hires_fix=HiresFix(96, 96, 0.5)))
    finally:
        handle.remove()
    assert out[0].image.size == (96, 96)
    assert sizes
    assert set(sizes) == {(12, 12)}


def test_a_refiner_of_another_base_model_is_a_clear_error(executor: DiffusersExecutor) -> None:
    job = replace(sdxl_job(refiner=Refiner("tiny-sdxl-refiner", 0.5)), checkpoint="tiny-sd15")
    with pytest.raises(JobError, match="refiner 'tiny-sdxl-refiner' is SDXL"):
        executor.generate(job)


def test_an_sdxl_checkpoint_that_is_not_a_refiner_is_refused(executor: DiffusersExecutor) -> None:
    with pytest.raises(JobError, match="refiner 'tiny-sdxl' is not an SDXL refiner checkpoint"):
        executor.generate(sdxl_job(refiner=Refiner("tiny-sdxl", 0.5)))


def _sdxl_guided(pipe: Any, prompt: str, negative: str, cfg: float, refiner: bool) -> Any:
    """diffusers' SDXL prompt encoding and size conditioning (the refiner's with aesthetic scores 6 / 2.5) around the
    pipe's UNet, with classifier-free guidance on the output."""
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt, device=torch.device("cpu"), do_classifier_free_guidance=True, negative_prompt=negative
    )
    projection = int(pipe.text_encoder_2.config.projection_dim)
    size = (64, 64)
    ids, neg_ids = pipe._get_add_time_ids(size, (0, 0), size, 6.0, 2.5, size, (0, 0), size, torch.float32, projection)
    if not refiner:
        neg_ids = ids

    @torch.no_grad()
    def fn(x: Tensor, t: Tensor) -> Tensor:
        n = x.shape[0]
        added = {
            "text_embeds": torch.cat([neg_pooled.expand(n, -1), pooled.expand(n, -1)]),
            "time_ids": torch.cat([neg_ids.expand(n, -1), ids.expand(n, -1)]),
        }
        ehs = torch.cat([neg.expand(n, -1, -1), embeds.expand(n, -1, -1)])
        out: Tensor = pipe.unet(
            torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=ehs, added_cond_kwargs=added
        )[0]
        u, c = out.float().chunk(2)
        return u + cfg * (c - u)

    return fn


@pytest.fixture(scope="module")
def reference_pipes(tiny_models_dir: Path) -> tuple[Any, Any]:
    """diffusers' pipelines over separately loaded copies of the tiny SDXL base and refiner."""
    return (
        load(tiny_models_dir, "tiny-sdxl.safetensors").pipe,
        load(tiny_models_dir, "tiny-sdxl-refiner.safetensors").pipe,
    )


@pytest.mark.parametrize(("name", "switch_at"), [("Euler a", 0.4), ("DPM++ 2M", 0.75)])
def test_refined_image_matches_a_diffusers_and_kdiffusion_reference(
    executor: DiffusersExecutor, reference_pipes: tuple[Any, Any], name: str, switch_at: float
) -> None:
    """End to end against diffusers' SDXL base and refiner pipelines (separately loaded) for prompts and size
    conditioning, k-diffusion's sampler over a model switched by A1111's rule, the base's VAE, A1111's 8 bits."""
    from tests.support.txt2img_reference import assert_close_unbiased, decode

    job = sdxl_job(sampler_name=SamplerName(name), refiner=Refiner("tiny-sdxl-refiner", switch_at))
    (ours,) = executor.generate(job)
    base_pipe, refiner_pipe = reference_pipes
    base = _sdxl_guided(base_pipe, job.prompt, job.negative_prompt, job.guidance_scale, refiner=False)
    refined = _sdxl_guided(refiner_pipe, job.prompt, job.negative_prompt, job.guidance_scale, refiner=True)
    switched = {"on": False}

    def model(x: Tensor, t: Tensor) -> Tensor:
        switched["on"] = switched["on"] or a1111_ratio(SCHEDULE.t_to_sigma(float(t.max()))) >= switch_at
        out: Tensor = (refined if switched["on"] else base)(x, t)
        return out

    latents, _ = reference_txt2img(name, model, (1, 4, 8, 8), job.steps, [job.seed], dtype=torch.float32)
    assert switched["on"]
    (ref,) = decode(base_pipe, latents)
    assert_close_unbiased(np.asarray(ours.image), ref)
