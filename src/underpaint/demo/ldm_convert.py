"""diffusers -> original (LDM / A1111) state-dict key layout, used to WRITE single-file checkpoints.

Reading goes the other way and is diffusers' job (``from_single_file``); this module exists so that tests and the
demo models exercise exactly the on-disk layout a user's civitai/A1111 file has:

- UNet   ``model.diffusion_model.*``  (input_blocks / middle_block / output_blocks numbering)
- VAE    ``first_stage_model.*``      (encoder.down.N.block.M, decoder.up reversed, 1x1-conv attention)
- SD 1.5 text encoder ``cond_stage_model.transformer.text_model.*`` (HF CLIP names)
- SDXL   ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, HF names) and
         ``conditioner.embedders.1.model.*`` (OpenCLIP bigG: resblocks, fused in_proj, transposed text_projection)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_TE_PREFIX = "cond_stage_model.transformer."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_TE_PREFIX = "conditioner.embedders.0.model."

_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


class ConversionError(ValueError):
    pass


def _rename(sd: Mapping[str, torch.Tensor], blocks: list[tuple[str, str, dict[str, str]]]) -> StateDict:
    """Map every key through the first matching (diffusers prefix, ldm prefix, inner renames) rule."""
    out: StateDict = {}
    for key, value in sd.items():
        for src, dst, inner in blocks:
            if key.startswith(src):
                rest = key[len(src) :]
                for a, b in inner.items():
                    if rest.startswith(a):
                        rest = b + rest[len(a) :]
                        break
                out[dst + rest] = value
                break
        else:
            raise ConversionError(f"no LDM name for diffusers key {key!r}")
    return out


def _layers_per_block(config: Mapping[str, Any]) -> int:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ConversionError("per-block layers_per_block is not an SD/SDXL layout")
    return lpb


def unet_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """UNet2DConditionModel state dict -> ``openaimodel.UNetModel`` names (without the ``model.diffusion_model.``)."""
    lpb = _layers_per_block(config)
    levels = len(config["block_out_channels"])
    r = _UNET_RESNET
    blocks: list[tuple[str, str, dict[str, str]]] = [
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("add_embedding.linear_1.", "label_emb.0.0.", {}),
        ("add_embedding.linear_2.", "label_emb.0.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", r),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", r),
    ]
    for i in range(levels):
        for j in range(lpb):
            n = (lpb + 1) * i + j + 1
            blocks.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0.", r))
            blocks.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1.", {}))
        if i < levels - 1:
            blocks.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.", {}))
    for i in range(levels):
        for j in range(lpb + 1):
            n = (lpb + 1) * i + j
            blocks.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0.", r))
            blocks.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1.", {}))
        if i < levels - 1:
            # The upsampler follows the last resnet, and its attention when the block has one.
            slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            blocks.append(
                (f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{(lpb + 1) * i + lpb}.{slot}.conv.", {})
            )
    return _rename(sd, blocks)


def vae_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """AutoencoderKL state dict -> LDM ``AutoencoderKL`` names (A1111 VAE file layout, no prefix)."""
    levels = len(config["block_out_channels"])
    lpb = _layers_per_block(config)
    blocks: list[tuple[str, str, dict[str, str]]] = [
        ("encoder.conv_norm_out.", "encoder.norm_out.", {}),
        ("decoder.conv_norm_out.", "decoder.norm_out.", {}),
        ("encoder.conv_in.", "encoder.conv_in.", {}),
        ("encoder.conv_out.", "encoder.conv_out.", {}),
        ("decoder.conv_in.", "decoder.conv_in.", {}),
        ("decoder.conv_out.", "decoder.conv_out.", {}),
        ("quant_conv.", "quant_conv.", {}),
        ("post_quant_conv.", "post_quant_conv.", {}),
    ]
    for part in ("encoder", "decoder"):
        blocks.append((f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET))
        blocks.append((f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET))
        blocks.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION))
    for i in range(levels):
        for j in range(lpb):
            blocks.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET))
        blocks.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}))
        # The LDM decoder counts its levels from the lowest resolution up, diffusers from the top down.
        k = levels - 1 - i
        for j in range(lpb + 1):
            blocks.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{k}.block.{j}.", _VAE_RESNET))
        blocks.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{k}.upsample.conv.", {}))
    out = _rename(sd, blocks)
    # LDM's mid attention uses 1x1 convolutions where diffusers uses linear layers.
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            out[key] = value.reshape(*value.shape, 1, 1)
    return out


def clip_to_ldm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """HF CLIPTextModel keys are what SD 1.5 and SDXL TE1 store, only the position_ids buffer is left out."""
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def open_clip_to_ldm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """HF CLIPTextModelWithProjection -> OpenCLIP text tower names (SDXL's second text encoder)."""
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    layer_prefix = "text_model.encoder.layers."
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            # OpenCLIP multiplies x @ P, a Linear computes x @ W.T.
            out["text_projection"] = value.T.contiguous()
        elif key.startswith(layer_prefix):
            index, rest = key[len(layer_prefix) :].split(".", 1)
            base = f"transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                qkv.setdefault(f"{base}attn.in_proj_{kind}", {})[proj] = value
                continue
            for a, b in _OPEN_CLIP_LAYER.items():
                if rest.startswith(a):
                    out[base + b + rest[len(a) :]] = value
                    break
            else:
                raise ConversionError(f"no OpenCLIP name for {key!r}")
        else:
            raise ConversionError(f"no OpenCLIP name for {key!r}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def _prefixed(prefix: str, sd: Mapping[str, torch.Tensor]) -> StateDict:
    return {prefix + k: v for k, v in sd.items()}


def checkpoint_to_ldm(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoders: list[torch.nn.Module],
    *,
    refiner: bool = False,
) -> StateDict:
    """A whole SD 1.5 (one text encoder), SDXL (two) or SDXL refiner (``refiner``: OpenCLIP-G alone, as
    ``conditioner.embedders.0.model``) model as one A1111-style state dict."""
    unet_cfg: Mapping[str, Any] = unet.config  # type: ignore[assignment]
    vae_cfg: Mapping[str, Any] = vae.config  # type: ignore[assignment]
    out = _prefixed(UNET_PREFIX, unet_to_ldm(unet.state_dict(), unet_cfg))
    out.update(_prefixed(VAE_PREFIX, vae_to_ldm(vae.state_dict(), vae_cfg)))
    if refiner and len(text_encoders) == 1:
        out.update(_prefixed(SDXL_REFINER_TE_PREFIX, open_clip_to_ldm(text_encoders[0].state_dict())))
    elif len(text_encoders) == 1:
        out.update(_prefixed(SD15_TE_PREFIX, clip_to_ldm(text_encoders[0].state_dict())))
    elif len(text_encoders) == 2:
        out.update(_prefixed(SDXL_TE1_PREFIX, clip_to_ldm(text_encoders[0].state_dict())))
        out.update(_prefixed(SDXL_TE2_PREFIX, open_clip_to_ldm(text_encoders[1].state_dict())))
    else:
        raise ConversionError("expected one (SD 1.5) or two (SDXL) text encoders")
    # Safetensors refuses shared or non-contiguous storage.
    return {k: v.detach().contiguous().clone() for k, v in out.items()}
