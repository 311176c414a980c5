"""An independent A1111 (>= 1.6) txt2img reference for the pixel tests: diffusers' pipeline parts (prompt encoding,
UNet, VAE) on a separately loaded copy of the checkpoint, k-diffusion's samplers (``tests.support.samplers``) or
diffusers' DDIM/PNDM/UniPC schedulers driven over A1111's timestep list, and A1111's 8-bit conversion in numpy.

Nothing here calls the engine's pipeline, samplers or prompt encoding; only the checkpoint loader is shared (the
models themselves are the common ground).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UniPCMultistepScheduler
from tests.support.samplers import K_NAMES, reference_txt2img
from torch import Tensor

from underpaint.engine.samplers import NoiseSource

LDM_BETAS: dict[str, Any] = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def a1111_uint8(decoded: np.ndarray) -> np.ndarray:
    """A1111's conversion of one decoded ``[3, H, W]`` float image: clamp((x + 1) / 2), times 255, truncated."""
    x = np.clip((decoded.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)
    out: np.ndarray = (255.0 * np.moveaxis(x, 0, 2)).astype(np.uint8)
    return out


def pipeline_of(loaded: Any) -> Any:
    """diffusers' txt2img pipeline over a loaded SD 1.5 checkpoint's modules."""
    pipe: Any = StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=loaded.vae,
        text_encoder=loaded.text_encoders[0],
        tokenizer=loaded.tokenizers[0],
        unet=loaded.unet,
        scheduler=DDIMScheduler(**LDM_BETAS),  # type: ignore[no-untyped-call]
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Request:
    sampler: str
    seeds: list[int]
    steps: int = 4
    cfg: float = 7.0
    width: int = 64
    height: int = 64
    prompt: str = "a cat"
    negative: str = ""
    clip_skip: int = 1  # A1111's meaning: 1 = last layer (diffusers' clip_skip is this minus 1)


def guided_model(pipe: Any, req: Request) -> Callable[[Tensor, Tensor], Tensor]:
    """diffusers' prompt encoding and UNet with classifier-free guidance on the output, [uncond, cond] in one call."""
    # Each prompt encoded as a positive one: diffusers applies ``clip_skip`` to the prompt but not to the negative
    # prompt, A1111 to both.
    cond, uncond = (
        pipe.encode_prompt(
            text, torch.device("cpu"), 1, False, clip_skip=req.clip_skip - 1 if req.clip_skip > 1 else None
        )[0]
        for text in (req.prompt, req.negative)
    )

    @torch.no_grad()
    def fn(x: Tensor, t: Tensor) -> Tensor:
        n = x.shape[0]
        ehs = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
        out: Tensor = pipe.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=ehs).sample
        u, c = out.float().chunk(2)
        return u + req.cfg * (c - u)

    return fn


def _timestep_scheduler(name: str) -> Any:
    if name == "DDIM":
        return DDIMScheduler(  # type: ignore[no-untyped-call]
            **LDM_BETAS, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False
        )
    if name == "PLMS":
        return PNDMScheduler(  # type: ignore[no-untyped-call]
            **LDM_BETAS, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True
        )
    return UniPCMultistepScheduler(  # type: ignore[no-untyped-call]
        **LDM_BETAS,
        solver_order=3,
        solver_type="bh1",
        final_sigmas_type="sigma_min",
        timestep_spacing="linspace",
        lower_order_final=True,
        predict_x0=True,
    )


def _a1111_timesteps(steps: int) -> list[int]:
    """A1111 >= 1.6's DDIM/PLMS/UniPC grid, written out here: ``clip(range(0, 1000, 1000 // steps) + 1, 0, 999)``."""
    return [min(t + 1, 999) for t in range(0, 1000, 1000 // steps)]


def _timestep_sample(name: str, model: Callable[[Tensor, Tensor], Tensor], x: Tensor, steps: int) -> Tensor:
    """DDIM / PLMS from the unit-variance noise over A1111's grid down to timestep 1; UniPC with one step per grid
    entry (the tests pick step counts whose continuous grid falls on whole timesteps for UniPC)."""
    sched = _timestep_scheduler(name)
    grid = _a1111_timesteps(steps)

    def call(x_: Tensor, t: int) -> Tensor:
        return model(x_, torch.full((x_.shape[0],), float(t)))

    if name == "UniPC":
        sched.set_timesteps(len(grid))
        for t in sched.timesteps:
            x = sched.step(call(x, int(t)), t, x).prev_sample
        return x
    sched.set_timesteps(steps)
    desc = list(reversed(grid))
    sequence = desc[:-1] if name == "DDIM" else [desc[0], desc[1], *desc[1:-1]]  # PLMS: improved-Euler start
    for t in sequence:
        x = sched.step(call(x, t), t, x).prev_sample
    return x


def reference_latents(pipe: Any, req: Request) -> Tensor:
    model = guided_model(pipe, req)
    shape = (len(req.seeds), 4, req.height // 8, req.width // 8)
    if req.sampler in K_NAMES:
        latents, _ = reference_txt2img(req.sampler, model, shape, req.steps, req.seeds, dtype=torch.float32)
        return latents
    first = NoiseSource(req.seeds).randn_like(torch.empty(shape))
    return _timestep_sample(req.sampler, model, first, req.steps)


@torch.no_grad()
def decode(pipe: Any, latents: Tensor) -> list[np.ndarray]:
    out = []
    for latent in latents:
        pixels = pipe.vae.decode(latent[None] / pipe.vae.config.scaling_factor).sample
        out.append(a1111_uint8(pixels[0].float().numpy()))
    return out


def reference_images(pipe: Any, req: Request) -> list[np.ndarray]:
    return decode(pipe, reference_latents(pipe, req))


def assert_close_unbiased(ours: np.ndarray, ref: np.ndarray) -> None:
    """Within one level everywhere and no bias (mean signed difference near 0)."""
    diff = ours.astype(np.int16) - ref.astype(np.int16)
    assert np.abs(diff).max() <= 1, f"max difference {np.abs(diff).max()}"
    assert abs(diff.mean()) <= 0.02, f"mean difference {diff.mean()}"
