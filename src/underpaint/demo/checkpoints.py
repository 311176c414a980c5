"""Tiny random-weight models written in the real on-disk formats (tests, demos, ``underpaint demo-models DIR``).

Shapes follow field notes 2: an SD 1.5-shaped UNet with 4 levels (32, 32, 64, 64), one layer per block, cross
attention 32, a x8 VAE and a 5-layer CLIP text encoder of width 32 with the real 49408-token vocabulary. The SDXL
twin has TE1 width 32 and TE2 width 64: equal widths make diffusers' single-file loader mistake one encoder for the
other (field-notes trap). Everything is seeded, so the files are byte-identical from run to run.

Single files are written in the original LDM/A1111 key layout (``demo.ldm_convert``) with a sidecar ``<stem>.config/``
(the tiny shapes are not the shipped real ones), so they load through exactly the code path of a user's file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from underpaint.demo.ldm_convert import checkpoint_to_ldm, vae_to_ldm
from underpaint.engine.loader import SD15_CONFIG, SDXL_CONFIG, SDXL_REFINER_CONFIG, TOKENIZER_DIR
from underpaint.engine.weights import load_state_dict_file

SD15_SEED = 1500
SD15_INPAINTING_SEED = 1900
SDXL_SEED = 1024
SDXL_REFINER_SEED = 2048
VAE_SEED = 777
# One key only: safetensors writes metadata in hash-map order, so several keys would make the bytes vary.
_META = {"format": "pt"}


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _text_config(hidden: int, act: str, projection: int) -> CLIPTextConfig:
    values: dict[str, Any] = {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": projection,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    return CLIPTextConfig(**values)


def _tiny_vae(scaling_factor: float, force_upcast: bool) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=128,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def tiny_sd15_components(seed: int = SD15_SEED, in_channels: int = 4) -> dict[str, torch.nn.Module]:
    """``unet``, ``vae``, ``text_encoder`` of the tiny SD 1.5 model (fp32, CPU, eval mode). ``in_channels=9``
    makes an inpainting UNet (latent + mask + masked-image latent)."""
    _seeded(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
        # One layer per block keeps a 128 px img2img near 1 s on one thread; the SDXL twin keeps the real 2.
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    _seeded(seed + 1)
    vae = _tiny_vae(0.18215, force_upcast=False)
    _seeded(seed + 2)
    te = CLIPTextModel(_text_config(32, "quick_gelu", 32))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": te.eval()}


def tiny_sdxl_components(seed: int = SDXL_SEED) -> dict[str, torch.nn.Module]:
    """``unet``, ``vae``, ``text_encoder`` (CLIP-L-like, width 32), ``text_encoder_2`` (bigG-like, width 64)."""
    te1_hidden, te2_hidden, time_dim = 32, 64, 8
    _seeded(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=te1_hidden + te2_hidden,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # pooled TE2 output + 6 micro-conditioning ids (original size, crop, target size)
        projection_class_embeddings_input_dim=te2_hidden + 6 * time_dim,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    _seeded(seed + 1)
    vae = _tiny_vae(0.13025, force_upcast=True)
    _seeded(seed + 2)
    te1 = CLIPTextModel(_text_config(te1_hidden, "quick_gelu", te1_hidden))
    _seeded(seed + 3)
    te2 = CLIPTextModelWithProjection(_text_config(te2_hidden, "gelu", te2_hidden))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": te1.eval(), "text_encoder_2": te2.eval()}


def tiny_sdxl_refiner_components(seed: int = SDXL_REFINER_SEED) -> dict[str, torch.nn.Module]:
    """The SDXL refiner's layout, tiny: ``unet`` conditioned on OpenCLIP-G alone (cross-attention width 64) plus
    the pooled output and 5 micro-conditioning ids (original size, crop, aesthetic score), ``text_encoder_2``, and
    the tiny SDXL's own VAE (the real base and refiner ship the same VAE)."""
    te2_hidden, time_dim = 64, 8
    _seeded(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 1),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=te2_hidden,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=te2_hidden + 5 * time_dim,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = tiny_sdxl_components()["vae"]
    _seeded(seed + 3)
    te2 = CLIPTextModelWithProjection(_text_config(te2_hidden, "gelu", te2_hidden))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder_2": te2.eval()}


def tiny_vae_override(seed: int = VAE_SEED) -> AutoencoderKL:
    """A VAE with the tiny checkpoints' architecture but its own random weights."""
    _seeded(seed)
    return _tiny_vae(0.18215, force_upcast=False).eval()


def _write_config_tree(dest: Path, parts: dict[str, torch.nn.Module], shipped: Path) -> None:
    """A diffusers config tree without weights: model_index + scheduler from the shipped tree, model configs."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(shipped / "model_index.json", dest / "model_index.json")
    (dest / "scheduler").mkdir()
    shutil.copy2(shipped / "scheduler" / "scheduler_config.json", dest / "scheduler" / "scheduler_config.json")
    for name, module in parts.items():
        (dest / name).mkdir()
        config: Any = module.config
        if hasattr(config, "to_json_file"):  # transformers config
            config.to_json_file(str(dest / name / "config.json"))
        else:
            module.save_config(str(dest / name))  # type: ignore[operator]


def _write_single_file(path: Path, parts: dict[str, torch.nn.Module], shipped: Path) -> None:
    encoders = [parts[name] for name in ("text_encoder", "text_encoder_2") if name in parts]
    sd = checkpoint_to_ldm(parts["unet"], parts["vae"], encoders, refiner="text_encoder" not in parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path), metadata=_META)
    _write_config_tree(path.with_name(path.name.rsplit(".", 1)[0] + ".config"), parts, shipped)


def _write_diffusers_folder(dest: Path, parts: dict[str, torch.nn.Module]) -> None:
    scheduler = PNDMScheduler.from_pretrained(str(SD15_CONFIG), subfolder="scheduler", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=parts["vae"],  # type: ignore[arg-type]
        text_encoder=parts["text_encoder"],  # type: ignore[arg-type]
        tokenizer=tokenizer,
        unet=parts["unet"],  # type: ignore[arg-type]
        scheduler=scheduler,
        safety_checker=None,  # type: ignore[arg-type]  # diffusers annotates these as required
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    if dest.exists():
        shutil.rmtree(dest)
    pipe.save_pretrained(str(dest), safe_serialization=True)


def write_ckpt(safetensors_path: Path, dest: Path) -> Path:
    """The same weights as a pickle ``.ckpt`` the way old A1111 checkpoints are stored: ``{"state_dict": ...}``."""
    sd = load_state_dict_file(safetensors_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "global_step": 0}, str(dest))
    return dest


def write_demo_models(models_dir: Path) -> dict[str, Path]:
    """Write the tiny models into the models layout and return their paths by name:

    ``tiny-sd15`` / ``tiny-sdxl`` (``checkpoint/*.safetensors`` + sidecar ``*.config/``), ``tiny-sdxl-refiner``
    (the same for the SDXL refiner: OpenCLIP-G only as ``conditioner.embedders.0``), ``tiny-sd15-inpainting``
    (the same, with a 9-channel UNet as in SD 1.5 inpainting checkpoints), ``tiny-sd15-diffusers``
    (``checkpoint/`` diffusers folder, same weights as tiny-sd15), ``tiny-vae`` (``vae/tiny-vae.safetensors`` +
    sidecar ``tiny-vae.config/config.json``, A1111 VAE layout, fits both tiny checkpoints).
    """
    models_dir = Path(models_dir)
    ckpt_dir = models_dir / "checkpoint"
    vae_dir = models_dir / "vae"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    vae_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "tiny-sd15": ckpt_dir / "tiny-sd15.safetensors",
        "tiny-sdxl": ckpt_dir / "tiny-sdxl.safetensors",
        "tiny-sdxl-refiner": ckpt_dir / "tiny-sdxl-refiner.safetensors",
        "tiny-sd15-diffusers": ckpt_dir / "tiny-sd15-diffusers",
        "tiny-sd15-inpainting": ckpt_dir / "tiny-sd15-inpainting.safetensors",
        "tiny-vae": vae_dir / "tiny-vae.safetensors",
    }
    with torch.no_grad():
        sd15 = tiny_sd15_components()
        _write_single_file(paths["tiny-sd15"], sd15, SD15_CONFIG)
        _write_diffusers_folder(paths["tiny-sd15-diffusers"], sd15)
        _write_single_file(paths["tiny-sdxl"], tiny_sdxl_components(), SDXL_CONFIG)
        _write_single_file(paths["tiny-sdxl-refiner"], tiny_sdxl_refiner_components(), SDXL_REFINER_CONFIG)
        _write_single_file(
            paths["tiny-sd15-inpainting"], tiny_sd15_components(SD15_INPAINTING_SEED, in_channels=9), SD15_CONFIG
        )
        vae = tiny_vae_override()
        vae_sd = vae_to_ldm(vae.state_dict(), vae.config)
        safetensors.torch.save_file({k: v.contiguous() for k, v in vae_sd.items()}, str(paths["tiny-vae"]), _META)
        # The sidecar makes the file loadable on its own; with a checkpoint, its scaling factor still wins.
        side = vae_dir / "tiny-vae.config"
        side.mkdir(exist_ok=True)
        vae.save_config(str(side))
    return paths
