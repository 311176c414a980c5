"""The final float image becomes uint8 exactly as A1111 does: clamp((x + 1) / 2, 0, 1), times 255, truncated.

The reference is computed here, independently, from the tensor the VAE decoded (captured on the way out of
``vae.decode``), with A1111's published steps in numpy; the service's images must equal it in every output format.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.config import Settings
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.job import GenerationJob
from underpaint.engine.metadata import encode_image
from underpaint.registry import ModelRegistry
from underpaint.vocabulary import SamplerName


def a1111_uint8(decoded: np.ndarray) -> np.ndarray:
    """A1111's conversion of one decoded ``[3, H, W]`` float image (its published semantics, float32)."""
    x = np.clip((decoded.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)
    x = 255.0 * np.moveaxis(x, 0, 2)
    out: np.ndarray = x.astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def generated(tiny_models_dir: Path) -> tuple[list[np.ndarray], list[Image.Image]]:
    """Two images of one job and the float tensors their VAE decodes returned."""
    registry = ModelRegistry(tiny_models_dir)
    executor = DiffusersExecutor(Settings(models_dir=tiny_models_dir, device="cpu", torch_threads=1), registry)
    decoded: list[np.ndarray] = []
    job = GenerationJob(
        checkpoint="tiny-sd15",
        init_image=Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        prompt="a cat",
        negative_prompt="",
        width=64,
        height=64,
        image_num=2,
        steps=4,
        guidance_scale=7.0,
        sampler_name=SamplerName("Euler a"),
        seed=1,
        strength=0.75,
    )
    loaded = executor.cache.get(executor._entry("checkpoint", job.checkpoint))
    real_decode = loaded.vae.decode

    def recording_decode(*args: Any, **kwargs: Any) -> Any:
        out = real_decode(*args, **kwargs)
        decoded.append(out[0][0].detach().float().cpu().numpy())
        return out

    loaded.vae.decode = recording_decode
    try:
        images = [g.image for g in executor.generate(job)]
    finally:
        del loaded.vae.decode
    return decoded, images


def test_pixels_are_truncated_as_a1111_does(generated: tuple[list[np.ndarray], list[Image.Image]]) -> None:
    decoded, images = generated
    assert len(decoded) == len(images) == 2
    for tensor, image in zip(decoded, images, strict=True):
        ours = np.asarray(image)
        assert np.array_equal(ours, a1111_uint8(tensor))
        # Not rounding: rounding would be half a level brighter on average, and differ on many pixels.
        rounded = np.rint(255.0 * np.clip((tensor + 1) / 2, 0, 1)).transpose(1, 2, 0).astype(np.uint8)
        diff = ours.astype(np.int16) - rounded.astype(np.int16)
        assert set(np.unique(diff)) <= {-1, 0}
        assert (diff == -1).mean() > 0.3


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_every_output_format_carries_the_truncated_pixels(
    generated: tuple[list[np.ndarray], list[Image.Image]], fmt: str
) -> None:
    decoded, images = generated
    reference = Image.fromarray(a1111_uint8(decoded[0]))
    ours = np.asarray(Image.open(io.BytesIO(encode_image(images[0], fmt, "infotext"))).convert("RGB"))
    expected = np.asarray(Image.open(io.BytesIO(encode_image(reference, fmt, "infotext"))).convert("RGB"))
    assert np.array_equal(ours, expected)
    if fmt == "png":  # lossless: the file holds the reference pixels themselves
        assert np.array_equal(ours, np.asarray(reference))


def test_to_uint8_edges() -> None:
    from underpaint.engine.pipeline import to_uint8

    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 7).expand(3, 1, 7)
    assert to_uint8(x)[0, :, 0].tolist() == [0, 0, 0, 127, 254, 255, 255]
