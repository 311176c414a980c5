"""Random-weight models in the real SD 1.5 and SDXL shapes, in the published file layouts, with no sidecar.

For the real-shape checks (``tests/realshape``, ``scripts/gpu-check``, ``bench/gpu.py``): they prove that the loader
recognises and configures full-size A1111 single files from their keys alone, and that full-size tensors flow through
every path, without downloading GBs of real weights. They draw noise, not pictures.

Memory: the names and shapes come from the diffusers models built on the meta device and converted to the A1111
layout there; each tensor's values are then drawn and streamed straight into the ``.safetensors`` file, so writing
SDXL (6.9 GB in fp16) holds one tensor at a time. Values: norms' weights 1 and every bias 0, embedding tables
N(0, 0.02), other weights N(0, 1/fan_in) (keeps activations near unit scale through the depth, in fp16 too).
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from underpaint.demo.adapters import (
    IMAGE_ENCODERS_DIR,
    ip_adapter_state,
    lora_layers,
    meta_models,
    save_ip_adapter,
    save_kohya_lora,
)
from underpaint.demo.ldm_convert import checkpoint_to_ldm

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "engine" / "configs"
SD15_CONFIG = CONFIG_ROOT / "sd15"
SDXL_CONFIG = CONFIG_ROOT / "sdxl"

_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}

# ViT-H/14, the image encoder of ip-adapter_sd15.bin (models/image_encoder in h94/IP-Adapter).
VIT_H_CONFIG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


def _values(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    device = gen.device
    if dtype == torch.int64:  # position_ids
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
    leaf = name.rsplit(".", 1)[-1]
    if "embedding" in name and not leaf.startswith("bias"):
        out = torch.randn(shape, generator=gen, device=device) * 0.02
    elif len(shape) == 0:  # open_clip's logit_scale
        out = torch.full(shape, math.log(100.0))
    elif len(shape) == 1:
        out = torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    elif leaf.endswith("bias"):
        out = torch.zeros(shape)
    else:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        out = torch.randn(shape, generator=gen, device=device) / math.sqrt(fan_in)
    return out.to(dtype).cpu()


def write_random_safetensors(
    path: Path,
    shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    seed: int,
    metadata: dict[str, str] | None = None,
    device: str = "cpu",
) -> Path:
    """A ``.safetensors`` file of ``shapes`` (name -> (shape, dtype)) with seeded values, one tensor in memory.
    ``device="cuda"`` draws them on the GPU (seconds instead of minutes for SDXL; other values than on CPU)."""
    names = sorted(shapes)
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name in names:
        shape, dtype = shapes[name]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device).manual_seed(seed)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            shape, dtype = shapes[name]
            tensor = _values(name, shape, dtype, gen).contiguous()
            f.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    tmp.replace(path)
    return path


def _meta_checkpoint_shapes(config_dir: Path, sdxl: bool, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], Any]]:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    unet, encoders = meta_models(config_dir, sdxl)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(json.loads((config_dir / "vae" / "config.json").read_text()))
    ldm = checkpoint_to_ldm(unet, vae, encoders)
    return {k: (tuple(v.shape), dtype if v.is_floating_point() else torch.int64) for k, v in ldm.items()}


def write_real_checkpoint(
    path: Path, sdxl: bool, dtype: torch.dtype = torch.float16, seed: int = 0, device: str = "cpu"
) -> Path:
    """An A1111 single-file checkpoint in the real SD 1.5 (``sdxl=False``, 1.07 B parameters) or SDXL (3.47 B)
    shapes, keys only: no sidecar config."""
    shapes = _meta_checkpoint_shapes(SDXL_CONFIG if sdxl else SD15_CONFIG, sdxl, dtype)
    return write_random_safetensors(path, shapes, seed, device=device)


def write_real_lora(path: Path, sdxl: bool, rank: int = 16, seed: int = 1) -> Path:
    """A kohya LoRA (UNet attention/FF and conv layers, text encoders) at the real shapes, fp16."""
    unet, encoders = meta_models(SDXL_CONFIG if sdxl else SD15_CONFIG, sdxl)
    layers = lora_layers(unet, encoders, sdxl=sdxl, rank=rank, alpha=float(rank) / 2, conv=True, seed=seed)
    half = [dataclasses.replace(layer, down=layer.down.half(), up=layer.up.half()) for layer in layers]
    return save_kohya_lora(path, half, metadata={"ss_network_dim": str(rank)})


def write_real_controlnet(path: Path, sdxl: bool = False, dtype: torch.dtype = torch.float16, seed: int = 2) -> Path:
    """A ControlNet in the lllyasviel single-file layout (``control_model.*``) at the real shapes; no sidecar."""
    from diffusers.models.controlnets.controlnet import ControlNetModel

    from underpaint.demo.controlnet import controlnet_to_ldm

    config = json.loads((CONFIG_ROOT / ("controlnet_sdxl" if sdxl else "controlnet_sd15") / "config.json").read_text())
    with torch.device("meta"):
        cn = ControlNetModel.from_config(config)
    ldm = controlnet_to_ldm(cn.state_dict(), cn.config)
    return write_random_safetensors(path, {k: (tuple(v.shape), dtype) for k, v in ldm.items()}, seed)


def write_real_ip_adapter_sd15(ipadapter_dir: Path, dtype: torch.dtype = torch.float16, seed: int = 3) -> Path:
    """``ip-adapter_sd15.bin`` (``{"image_proj", "ip_adapter"}``, torch pickle as published) and its ViT-H/14 image
    encoder as a transformers folder under ``image_encoders/sd15``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet, _ = meta_models(SD15_CONFIG, False)
    state = ip_adapter_state(unet, image_embed_dim=int(VIT_H_CONFIG["projection_dim"]), seed=seed)
    state = {group: {k: v.to(dtype) for k, v in part.items()} for group, part in state.items()}
    bin_path = save_ip_adapter(ipadapter_dir / "ip-adapter_sd15.bin", state)
    folder = ipadapter_dir / IMAGE_ENCODERS_DIR / "sd15"
    folder.mkdir(parents=True, exist_ok=True)
    config = CLIPVisionConfig(**VIT_H_CONFIG)
    with torch.device("meta"):
        encoder = CLIPVisionModelWithProjection(config)
    config.dtype = str(dtype).removeprefix("torch.")
    config.to_json_file(str(folder / "config.json"))
    shapes = {k: (tuple(v.shape), dtype) for k, v in encoder.state_dict().items()}
    write_random_safetensors(folder / "model.safetensors", shapes, seed + 1)
    return bin_path


def write_real_models(
    models_dir: Path, sdxl: bool = True, adapters: bool = True, extra_sd15: bool = False, device: str = "cpu"
) -> dict[str, Path]:
    """The real-shape set under ``models_dir`` (the models-folder layout): ``real-sd15.safetensors``, with ``sdxl``
    ``real-sdxl.safetensors``, with ``adapters`` the SD 1.5 LoRA, ControlNet (canny name) and IP-Adapter, with
    ``extra_sd15`` a second SD 1.5 checkpoint (``real-sd15-b``, other values) for model-switch timings."""
    ckpt = models_dir / "checkpoint"
    out = {"real-sd15": write_real_checkpoint(ckpt / "real-sd15.safetensors", sdxl=False, seed=10, device=device)}
    if extra_sd15:
        out["real-sd15-b"] = write_real_checkpoint(ckpt / "real-sd15-b.safetensors", sdxl=False, seed=11, device=device)
    if sdxl:
        out["real-sdxl"] = write_real_checkpoint(ckpt / "real-sdxl.safetensors", sdxl=True, seed=12, device=device)
    if adapters:
        out["lora"] = write_real_lora(models_dir / "lora" / "real-lora-sd15.safetensors", sdxl=False)
        out["controlnet"] = write_real_controlnet(models_dir / "controlnet" / "control_v11p_sd15_canny.safetensors")
        out["ipadapter"] = write_real_ip_adapter_sd15(models_dir / "ipadapter")
    return out
