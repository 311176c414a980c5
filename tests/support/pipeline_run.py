"""One job through ``engine.pipeline`` without an executor, the way the executor runs a batch of one
(``prepare_member`` then ``sample_batch``): for tests that drive the pipeline with their own ``Components``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from underpaint.engine import pipeline
from underpaint.engine.job import ProgressCallback


def batch_spec(inputs: pipeline.PipelineInputs) -> pipeline.BatchSpec:
    return pipeline.BatchSpec(
        inputs.width,
        inputs.height,
        inputs.steps,
        inputs.sampler_name,
        inputs.strength,
        txt2img=inputs.init_image is None,
        hires_fix=inputs.hires_fix,
    )


def generate(
    c: pipeline.Components,
    inputs: pipeline.PipelineInputs,
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[Image.Image]:
    """``len(inputs.seeds)`` images of one job in one UNet batch; its failure raised."""
    member = pipeline.prepare_member(c, inputs, on_progress, should_cancel)
    (outcome,) = pipeline.sample_batch(c, batch_spec(inputs), [member])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def build_model_fn(
    c: pipeline.Components, inputs: pipeline.PipelineInputs
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The guided model function of one job alone: what the sampler calls for it."""
    batch = pipeline._Batch([pipeline.prepare_member(c, inputs)])
    return pipeline.build_batch_model_fn(c, batch_spec(inputs), batch, lambda: 0.0)
