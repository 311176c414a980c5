"""The tiny demo models are in the real A1111/LDM on-disk layout, deterministic, and the converter fits real shapes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import safetensors.torch
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from underpaint.demo.checkpoints import write_demo_models
from underpaint.demo.ldm_convert import open_clip_to_ldm, unet_to_ldm, vae_to_ldm
from underpaint.engine.loader import SD15_CONFIG, SDXL_CONFIG


def _keys(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def test_checkpoints_use_the_original_key_layout(tiny_models_dir: Path) -> None:
    sd15 = _keys(tiny_models_dir / "checkpoint" / "tiny-sd15.safetensors")
    sdxl = _keys(tiny_models_dir / "checkpoint" / "tiny-sdxl.safetensors")
    for sd in (sd15, sdxl):
        prefixes = {k.split(".")[0] for k in sd}
        assert not any("down_blocks" in k or "up_blocks" in k for k in sd)  # nothing left in diffusers names
        assert "model.diffusion_model.input_blocks.0.0.weight" in sd
        assert "model.diffusion_model.time_embed.0.weight" in sd
        assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in sd
        assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # LDM 1x1 conv attention
        assert prefixes <= {"model", "first_stage_model", "cond_stage_model", "conditioner"}
    assert {k.split(".")[0] for k in sd15} == {"model", "first_stage_model", "cond_stage_model"}
    # Upsamplers follow the resnet (slot 1) of an UpBlock2D level and the attention (slot 2) of a cross-attn level.
    # Tiny SD 1.5 has one layer per block (2 output blocks per level), tiny SDXL the real two (3 per level).
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in sd15
    assert "model.diffusion_model.output_blocks.3.2.conv.weight" in sd15
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in sdxl
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in sdxl
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd15
    assert "model.diffusion_model.label_emb.0.0.weight" in sdxl
    te1 = sdxl["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"]
    te2 = "conditioner.embedders.1.model."
    assert sdxl[te2 + "token_embedding.weight"].shape == (49408, 64)
    assert te1.shape == (49408, 32)
    assert sdxl[te2 + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)
    for name in ("positional_embedding", "text_projection", "ln_final.weight", "transformer.resblocks.4.mlp.c_fc.bias"):
        assert te2 + name in sdxl, name
    assert not any(k.startswith("cond_stage_model.") for k in sdxl)


def test_vae_file_is_a1111_layout_with_its_own_weights(tiny_models_dir: Path) -> None:
    vae = _keys(tiny_models_dir / "vae" / "tiny-vae.safetensors")
    ckpt = _keys(tiny_models_dir / "checkpoint" / "tiny-sd15.safetensors")
    assert {k.split(".")[0] for k in vae} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    assert set(vae) == {k.removeprefix("first_stage_model.") for k in ckpt if k.startswith("first_stage_model.")}
    assert not torch.equal(vae["decoder.conv_out.weight"], ckpt["first_stage_model.decoder.conv_out.weight"])


def test_sidecar_configs_describe_the_tiny_shapes(tiny_models_dir: Path) -> None:
    side = tiny_models_dir / "checkpoint" / "tiny-sdxl.config"
    index = json.loads((side / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert json.loads((side / "text_encoder" / "config.json").read_text())["hidden_size"] == 32
    assert json.loads((side / "text_encoder_2" / "config.json").read_text())["hidden_size"] == 64
    assert json.loads((side / "unet" / "config.json").read_text())["cross_attention_dim"] == 96
    total = sum(f.stat().st_size for f in tiny_models_dir.rglob("*") if f.is_file())
    assert total < 200 * 1024**2  # everything demo-models writes (checkpoints, adapters, ControlNets, annotators)


def test_files_are_deterministic(tiny_models_dir: Path, tmp_path: Path) -> None:
    again = write_demo_models(tmp_path / "m")
    for name in ("tiny-sd15", "tiny-sdxl", "tiny-sdxl-refiner", "tiny-sd15-inpainting", "tiny-vae"):
        rel = again[name].relative_to(tmp_path / "m")
        assert (
            hashlib.sha256(again[name].read_bytes()).digest()
            == hashlib.sha256((tiny_models_dir / rel).read_bytes()).digest()
        ), name
    assert set(again) == {
        "tiny-sd15",
        "tiny-sdxl",
        "tiny-sdxl-refiner",
        "tiny-sd15-diffusers",
        "tiny-sd15-inpainting",
        "tiny-vae",
    }
    assert (again["tiny-sd15-diffusers"] / "model_index.json").exists()


def _meta_round_trip_unet(tree: Path) -> None:
    config = UNet2DConditionModel.load_config(tree / "unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)  # type: ignore[no-untyped-call]
    original = unet.state_dict()
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(original, unet.config).items()}
    back = convert_ldm_unet_checkpoint(ldm, unet.config)  # type: ignore[no-untyped-call]
    assert set(back) == set(original)
    assert all(back[k].shape == v.shape for k, v in original.items())


def test_converter_round_trips_real_unet_shapes() -> None:
    # diffusers' own reader must recover every key of the real-size models from what the writer produced.
    _meta_round_trip_unet(SD15_CONFIG)
    _meta_round_trip_unet(SDXL_CONFIG)


def test_converter_round_trips_real_vae_and_bigg_shapes() -> None:
    with init_empty_weights():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_CONFIG / "vae"))  # type: ignore[no-untyped-call]
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_CONFIG / "text_encoder_2"))
    vae_sd = vae.state_dict()
    back = convert_ldm_vae_checkpoint(vae_to_ldm(vae_sd, vae.config), vae.config)  # type: ignore[no-untyped-call]
    assert set(back) == set(vae_sd)
    prefix = "conditioner.embedders.1.model."
    te_sd = {k: v for k, v in te2.state_dict().items() if not k.endswith("position_ids")}
    ldm = {prefix + k: v for k, v in open_clip_to_ldm(te_sd).items()}
    assert ldm[prefix + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    back_te = convert_open_clip_checkpoint(te2, ldm, prefix=prefix)  # type: ignore[no-untyped-call]
    assert set(back_te) == set(te_sd)
    assert all(back_te[k].shape == v.shape for k, v in te_sd.items())
