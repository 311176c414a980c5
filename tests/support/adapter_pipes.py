"""Tiny random-weight SD 1.5 / SDXL img2img pipelines for the adapter tests (field notes 2 shapes, smaller).

``TinyLoaded`` is the duck-typed stand-in for ``engine.loader.LoadedCheckpoint`` (``pipe``, ``is_sdxl``, ``name``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from tests.support.tiny_text import text_config
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from underpaint.registry import ModelEntry, ModelRegistry

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "src" / "underpaint" / "engine" / "configs" / "clip_tokenizer"


@dataclass
class TinyLoaded:
    pipe: Any
    is_sdxl: bool
    name: str


def _vae() -> AutoencoderKL:
    return AutoencoderKL(  # type: ignore[no-untyped-call]
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(  # type: ignore[no-untyped-call]
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )


def tokenizer() -> CLIPTokenizer:
    loaded: CLIPTokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    return loaded


def tokenizer_pad_bang(tmp_dir: Path) -> CLIPTokenizer:
    target = tmp_dir / "tokenizer_2"
    if not target.exists():
        shutil.copytree(TOKENIZER_DIR, target)
        shutil.copyfile(target / "tokenizer_config_pad_bang.json", target / "tokenizer_config.json")
        (target / "special_tokens_map.json").unlink()
    loaded: CLIPTokenizer = CLIPTokenizer.from_pretrained(target)
    return loaded


def sd15(seed: int = 0, name: str = "tiny-sd15") -> TinyLoaded:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        sample_size=8,
    )
    pipe = StableDiffusionImg2ImgPipeline(  # type: ignore[no-untyped-call]
        vae=_vae(),
        text_encoder=CLIPTextModel(text_config(32, layers=2)),
        tokenizer=tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]  # hidden by diffusers' lazy exports
    return TinyLoaded(pipe, False, name)


def sdxl(tmp_dir: Path, seed: int = 0, name: str = "tiny-sdxl") -> TinyLoaded:
    torch.manual_seed(seed)
    te2 = CLIPTextModelWithProjection(text_config(64, projection=48, layers=2))
    unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=96,
        attention_head_dim=4,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 48,
        sample_size=8,
    )
    pipe = StableDiffusionXLImg2ImgPipeline(  # type: ignore[no-untyped-call]
        vae=_vae(),
        text_encoder=CLIPTextModel(text_config(32, layers=2)),
        text_encoder_2=te2,
        tokenizer=tokenizer(),
        tokenizer_2=tokenizer_pad_bang(tmp_dir),
        unet=unet,
        scheduler=_scheduler(),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]  # hidden by diffusers' lazy exports
    return TinyLoaded(pipe, True, name)


def init_image(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def run(loaded: TinyLoaded, prompt: str = "a photo of a cat", negative: str = "", **kwargs: Any) -> np.ndarray:
    """One fixed-seed img2img run; returns the uint8 image so equality means byte-identical output."""
    out = loaded.pipe(
        prompt=prompt,
        negative_prompt=negative,
        image=kwargs.pop("image", init_image()),
        strength=0.75,
        num_inference_steps=4,
        guidance_scale=7.0,
        generator=torch.Generator().manual_seed(kwargs.pop("seed", 1)),
        output_type="np",
        **kwargs,
    )
    return np.asarray((out.images[0] * 255).round().astype(np.uint8))


def text_encoders(loaded: TinyLoaded) -> list[Any]:
    pipe = loaded.pipe
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if loaded.is_sdxl else [])


def resolve(models_dir: Path, kind: str, name: str) -> ModelEntry:
    """Through the real registry, as the API resolves request names."""
    entry = ModelRegistry(models_dir).resolve(kind, name)
    assert entry is not None, f"{kind}/{name} not found in {models_dir}"
    return entry


def demo_models(tiny_models_dir: Path, dest: Path) -> Path:
    """A writable copy of the session's tiny demo checkpoints plus ``write_demo_adapters`` sized from their sidecars."""
    from underpaint.demo.adapters import write_demo_adapters

    shutil.copytree(tiny_models_dir, dest)
    write_demo_adapters(dest, dest / "checkpoint" / "tiny-sd15.config", dest / "checkpoint" / "tiny-sdxl.config")
    return dest


def load(models_dir: Path, checkpoint: str) -> Any:
    """A checkpoint through the real loader (``engine.loader.LoadedCheckpoint``)."""
    from underpaint.engine.loader import load_checkpoint

    return load_checkpoint(resolve(models_dir, "checkpoint", checkpoint), "cpu", torch.float32)
