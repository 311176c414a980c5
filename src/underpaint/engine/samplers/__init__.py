"""A1111-faithful samplers (A1111 1.6-1.8 names, >= 1.9 schedule types) over a diffusers-style UNet. See ``sampling``."""

from underpaint.engine.samplers.denoiser import make_denoiser, make_eps_fn
from underpaint.engine.samplers.noise import BrownianNoise, NoiseSource
from underpaint.engine.samplers.sampling import (
    expected_model_evals,
    full_sigmas,
    hires_schedule,
    img2img_model_evals,
    img2img_sigmas,
    img2img_steps,
    img2img_t_enc,
    img2img_timesteps,
    sample,
    sample_img2img,
    sample_txt2img,
    txt2img_steps,
)
from underpaint.engine.samplers.schedule import DiscreteSchedule
from underpaint.vocabulary import SAMPLER_NAMES

__all__ = [
    "SAMPLER_NAMES",
    "BrownianNoise",
    "DiscreteSchedule",
    "NoiseSource",
    "expected_model_evals",
    "full_sigmas",
    "hires_schedule",
    "img2img_model_evals",
    "img2img_sigmas",
    "img2img_steps",
    "img2img_t_enc",
    "img2img_timesteps",
    "make_denoiser",
    "make_eps_fn",
    "sample",
    "sample_img2img",
    "sample_txt2img",
    "txt2img_steps",
]
