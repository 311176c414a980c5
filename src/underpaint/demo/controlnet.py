"""Tiny random-weight ControlNets and annotator weights in the real on-disk formats (tests, ``underpaint demo-models``).

Each ControlNet is ``ControlNetModel.from_unet`` of a tiny demo UNet (``engine.demo``), so it fits the tiny
checkpoints exactly. Its zero convolutions (``controlnet_down_blocks``, ``controlnet_mid_block`` and the hint
encoder's ``conv_out``) start at zero in a fresh ControlNet, which would make every unit a no-op and every test pass
trivially; they get seeded random values instead.

Formats written:

* diffusers folder (``save_pretrained``: ``config.json`` + ``diffusion_pytorch_model.safetensors``);
* lllyasviel / A1111 single file in the original key layout (``control_model.input_blocks.*``, ``zero_convs.N.0``,
  ``input_hint_block.*``, ``middle_block_out.0``, ``time_embed.*``, SDXL ``label_emb.*``) with a sidecar
  ``<stem>.config/config.json`` (the tiny shapes are not the shipped real ones).

Names are the seed's, so requests that name them resolve when the files are present.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from diffusers.models.controlnets.controlnet import ControlNetModel

from underpaint.demo.annotators import write_demo_annotators
from underpaint.demo.checkpoints import tiny_sd15_components, tiny_sdxl_components
from underpaint.demo.ldm_convert import unet_to_ldm

StateDict = dict[str, torch.Tensor]
CONTROL_PREFIX = "control_model."
_UNET_PARTS = ("time_embedding.", "add_embedding.", "conv_in.", "down_blocks.", "mid_block.")
_META = {"format": "pt"}  # one key: safetensors writes metadata in hash-map order

SD15_CANNY = "control_v11p_sd15_canny.safetensors"  # single file
SD15_CANNY_DIFFUSERS = "control_v11p_sd15_canny_diffusers"  # the same weights as a diffusers folder
SD15_OPENPOSE = "control_v11p_sd15_openpose.safetensors"  # other weights, for multi-unit runs
SDXL_CANNY = "controlnet-canny-sdxl-1.0"  # diffusers folder
SDXL_DEPTH = "controlnet-depth-sdxl-1.0.safetensors"  # single file

SD15_CANNY_SEED = 4100
SD15_OPENPOSE_SEED = 4200
SDXL_CANNY_SEED = 4300
SDXL_DEPTH_SEED = 4400
ZERO_CONV_STD = 0.1


class ControlNetConversionError(ValueError):
    pass


def tiny_controlnet(is_sdxl: bool, seed: int) -> ControlNetModel:
    """A ControlNet copied from the tiny demo UNet, with seeded non-zero zero-convs (fp32, eval)."""
    unet = (tiny_sdxl_components() if is_sdxl else tiny_sd15_components())["unet"]
    cn = ControlNetModel.from_unet(unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zero_convs = [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * ZERO_CONV_STD)
    return cn.eval()


def controlnet_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """diffusers ``ControlNetModel`` state dict -> lllyasviel ``ControlNet`` names, with the ``control_model.`` prefix.

    The trainable copy of the UNet encoder has the UNet's names; the ControlNet-only parts are mapped here.
    """
    levels = len(config["block_out_channels"])
    # A ControlNet has no decoder; unet_to_ldm only needs the up-block types to name decoder keys it will not see.
    encoder_config = {
        "layers_per_block": config["layers_per_block"],
        "block_out_channels": config["block_out_channels"],
        "up_block_types": ("UpBlock2D",) * levels,
    }
    out = unet_to_ldm({k: v for k, v in sd.items() if k.startswith(_UNET_PARTS)}, encoder_config)
    n_hint = len(config["conditioning_embedding_out_channels"])
    for key, value in sd.items():
        if key.startswith(_UNET_PARTS):
            continue
        head, _, leaf = key.rpartition(".")  # leaf: weight / bias
        parts = head.split(".")
        if head == "controlnet_cond_embedding.conv_in":
            name = "input_hint_block.0"
        elif head == "controlnet_cond_embedding.conv_out":
            # The hint encoder is Sequential(conv, SiLU, conv, SiLU, ...): convs at even indices.
            name = f"input_hint_block.{2 * (2 * (n_hint - 1) + 1)}"
        elif parts[:2] == ["controlnet_cond_embedding", "blocks"]:
            name = f"input_hint_block.{2 * (int(parts[2]) + 1)}"
        elif parts[0] == "controlnet_down_blocks":
            name = f"zero_convs.{parts[1]}.0"
        elif head == "controlnet_mid_block":
            name = "middle_block_out.0"
        else:
            raise ControlNetConversionError(f"no lllyasviel name for diffusers ControlNet key {key!r}")
        out[f"{name}.{leaf}"] = value
    return {CONTROL_PREFIX + k: v.contiguous() for k, v in out.items()}


def write_single_file(cn: ControlNetModel, path: Path) -> Path:
    """``path`` (.safetensors, original layout) plus its sidecar ``<stem>.config/config.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = controlnet_to_ldm(cn.state_dict(), cn.config)
    safetensors.torch.save_file(sd, str(path), metadata=_META)
    side = path.with_name(path.name.rsplit(".", 1)[0] + ".config")
    if side.exists():
        shutil.rmtree(side)
    side.mkdir()
    cn.save_config(str(side))
    return path


def write_diffusers_folder(cn: ControlNetModel, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    cn.save_pretrained(str(dest), safe_serialization=True)
    return dest


def write_demo_controlnets(models_dir: Path) -> dict[str, Path]:
    """Tiny ControlNets into ``models_dir/controlnet/`` and tiny annotator weights into ``models_dir/annotator/``.

    Returns paths by file/folder name: SD 1.5 canny as a single file and (same weights) as a diffusers folder,
    SD 1.5 openpose (other weights) as a single file, SDXL canny as a diffusers folder, SDXL depth as a single file,
    plus every annotator file (``demo.annotators``).
    """
    folder = Path(models_dir) / "controlnet"
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    with torch.no_grad():
        canny = tiny_controlnet(False, SD15_CANNY_SEED)
        paths[SD15_CANNY] = write_single_file(canny, folder / SD15_CANNY)
        paths[SD15_CANNY_DIFFUSERS] = write_diffusers_folder(canny, folder / SD15_CANNY_DIFFUSERS)
        paths[SD15_OPENPOSE] = write_single_file(tiny_controlnet(False, SD15_OPENPOSE_SEED), folder / SD15_OPENPOSE)
        paths[SDXL_CANNY] = write_diffusers_folder(tiny_controlnet(True, SDXL_CANNY_SEED), folder / SDXL_CANNY)
        paths[SDXL_DEPTH] = write_single_file(tiny_controlnet(True, SDXL_DEPTH_SEED), folder / SDXL_DEPTH)
        paths.update(write_demo_annotators(Path(models_dir) / "annotator"))
    return paths
