"""SDXL's empty negative prompt: zero embeddings (context and pooled vector), as A1111 and diffusers do.

Reference: diffusers' ``StableDiffusionXLImg2ImgPipeline`` (``force_zeros_for_empty_prompt=True``), which zeroes
the unconditional embeddings when no negative prompt is given. Both pipelines run the same tiny SDXL weights; a
hook on the UNet records what each one hands it for the unconditional half of guidance.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
from PIL import Image
from tests.support import tiny_text
from tests.support.pipeline_run import generate

from underpaint.config import Settings
from underpaint.demo.checkpoints import tiny_sdxl_components
from underpaint.engine import pipeline
from underpaint.engine.conditioning import TextEncoderBundle
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.job import GenerationJob
from underpaint.engine.samplers import DiscreteSchedule
from underpaint.registry import ModelRegistry
from underpaint.vocabulary import SamplerName

SIZE = 64
PROMPT = "a red house by the sea"


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return tiny_sdxl_components()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return [tiny_text.tokenizer(), tiny_text.tokenizer_pad_bang(tmp_path_factory.mktemp("tok"))]


def _picture() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


class _UNetInputs:
    """Records the rows each UNet call receives: (context, pooled text embedding, time ids)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        added = kwargs["added_cond_kwargs"]
        for ctx, pooled, ids in zip(
            kwargs["encoder_hidden_states"], added["text_embeds"], added["time_ids"], strict=True
        ):
            self.rows.append((ctx.detach().clone(), pooled.detach().clone(), ids.detach().clone()))

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def record(parts: dict[str, Any]) -> Iterator[_UNetInputs]:
    rec = _UNetInputs(parts["unet"])
    yield rec
    rec.close()


def _diffusers_rows(parts: dict[str, Any], tokenizers: list[Any], record: _UNetInputs) -> list[Any]:
    pipe: Any = StableDiffusionXLImg2ImgPipeline(  # type: ignore[no-untyped-call]  # diffusers is unannotated
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=parts["unet"],
        scheduler=EulerDiscreteScheduler(),  # type: ignore[no-untyped-call]
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe(
        prompt=PROMPT,
        negative_prompt=None,
        image=_picture(),
        strength=0.5,
        num_inference_steps=2,
        guidance_scale=7.0,
        output_type="latent",
    )
    rows = record.rows[:2]  # the first UNet call: [uncond, cond]
    record.rows.clear()
    return rows


def _components(parts: dict[str, Any], tokenizers: list[Any]) -> pipeline.Components:
    return pipeline.Components(
        unet=parts["unet"],
        vae=parts["vae"],
        bundle=TextEncoderBundle(tokenizers, [parts["text_encoder"], parts["text_encoder_2"]], is_sdxl=True),
        schedule=DiscreteSchedule.from_betas(),
        prediction_type="epsilon",
        vae_scaling_factor=float(parts["vae"].config.scaling_factor),
        is_sdxl=True,
        device=torch.device("cpu"),
        dtype=torch.float32,
        vae_precision=pipeline.VaePrecision(),
    )


def _inputs(negative_prompt: str) -> pipeline.PipelineInputs:
    return pipeline.PipelineInputs(
        init_image=_picture(),
        prompt=PROMPT,
        negative_prompt=negative_prompt,
        width=SIZE,
        height=SIZE,
        seeds=[5],
        steps=2,
        guidance_scale=7.0,
        sampler_name=SamplerName("Euler"),
        strength=0.5,
    )


@pytest.mark.parity
def test_empty_negative_gives_the_unet_what_diffusers_gives_it(
    parts: dict[str, Any], tokenizers: list[Any], record: _UNetInputs
) -> None:
    ref_uncond, ref_cond = _diffusers_rows(parts, tokenizers, record)
    assert not ref_uncond[0].any()
    assert not ref_uncond[1].any()

    generate(_components(parts, tokenizers), _inputs(""))
    first_call = record.rows[:2]
    uncond = next(r for r in first_call if not r[0].any())
    cond = next(r for r in first_call if r[0].any())
    for ours, ref in ((uncond, ref_uncond), (cond, ref_cond)):
        torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)  # context [77, 96]
        torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-5)  # pooled vector
        torch.testing.assert_close(ours[2], ref[2])  # size micro-conditioning is never zeroed


def test_non_empty_or_blank_negative_is_encoded(parts: dict[str, Any], tokenizers: list[Any]) -> None:
    c = _components(parts, tokenizers)
    for negative in ("blurry", " "):  # A1111 zeroes only the exactly empty string
        _, uncond = pipeline.encode_conditioning(c, _inputs(negative))
        assert uncond.embeds.abs().sum() > 0
        assert uncond.pooled is not None
        assert uncond.pooled.abs().sum() > 0
    _, zero = pipeline.encode_conditioning(c, _inputs(""))
    assert zero.embeds.shape == (1, 77, 96)
    assert not zero.embeds.any()
    assert zero.pooled is not None
    assert not zero.pooled.any()


def test_sd15_empty_negative_is_still_encoded() -> None:
    """Only SDXL zeroes: A1111's SD 1.5 path encodes the empty prompt."""
    bundle = tiny_text.sd15_bundle()
    c = pipeline.Components(
        unet=None,
        vae=None,
        bundle=bundle,
        schedule=DiscreteSchedule.from_betas(),
        prediction_type="epsilon",
        vae_scaling_factor=0.18215,
        is_sdxl=False,
        device=torch.device("cpu"),
        dtype=torch.float32,
        vae_precision=pipeline.VaePrecision(),
    )
    _, uncond = pipeline.encode_conditioning(c, _inputs(""))
    assert uncond.embeds.abs().sum() > 0


def test_batch_mixing_empty_and_non_empty_negatives_equals_solo_runs(tiny_models_dir: Path) -> None:
    """Each job of a cross-task batch keeps its own unconditional embedding (zeros or encoded): in float64 a batched
    job is bit-identical to its solo run, and the empty-negative job differs from the same job with the empty
    string encoded (which is what a batch-wide rule would give it next to a non-empty mate)."""
    settings = Settings(models_dir=tiny_models_dir, torch_threads=1)
    executor = DiffusersExecutor(settings, ModelRegistry(tiny_models_dir), dtype=torch.float64)
    base = GenerationJob(
        checkpoint="tiny-sdxl.safetensors",
        init_image=_picture(),
        prompt=PROMPT,
        negative_prompt="",
        width=SIZE,
        height=SIZE,
        image_num=1,
        steps=4,
        guidance_scale=7.0,
        sampler_name=SamplerName("Euler a"),
        seed=11,
        strength=0.75,
    )
    jobs = [base, replace(base, negative_prompt="blurry, low quality", seed=12), replace(base, seed=13)]
    batched = executor.generate_batch(jobs)
    for j, out in zip(jobs, batched, strict=True):
        assert not isinstance(out, BaseException), out
        solo = executor.generate(j)
        np.testing.assert_array_equal(np.asarray(out[0].image), np.asarray(solo[0].image))
    empty = np.asarray(executor.generate(base)[0].image).astype(int)
    encoded = np.asarray(executor.generate(replace(base, negative_prompt=" "))[0].image).astype(int)
    assert np.abs(empty - encoded).max() > 1
