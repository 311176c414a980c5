"""Tiny adapter files in the real on-disk formats, for tests and ``underpaint demo-models``.

Everything here writes what users drop into the models folder, so loading goes through the same code as theirs:

* kohya/A1111 LoRA ``.safetensors``: ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. SD 1.5 names are the
  diffusers module paths (``lora_unet_down_blocks_0_attentions_0_..._to_q``, ``lora_te_text_model_...``), which is
  what kohya's sd-scripts write for SD 1.x; SDXL names are SGM/LDM paths (``lora_unet_input_blocks_4_1_...``,
  resnet convs as ``in_layers_2`` / ``out_layers_3``) with ``lora_te1_`` / ``lora_te2_``. LoCon adds the resnet 3x3
  convs (3x3 down, 1x1 up).
* diffusers/PEFT LoRA: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (alpha folded into B, as PEFT's default
  ``lora_alpha == r`` assumes).
* textual inversion: A1111 ``.pt`` (``string_to_param: {"*": tensor}``, ``string_to_token``, ``name``, ``step``...),
  A1111 ``.safetensors`` (``emb_params``), SDXL ``.safetensors`` (``clip_l`` + ``clip_g``).
* IP-Adapter: ``.bin`` (``torch.save({"image_proj": ..., "ip_adapter": ...})``) and ``.safetensors`` (flattened
  ``image_proj.*`` / ``ip_adapter.*``), plus a ``CLIPVisionModelWithProjection`` saved with ``save_pretrained``.

``write_demo_adapters`` sizes the files from a checkpoint's diffusers config tree (``unet/config.json``,
``text_encoder/config.json``, ``text_encoder_2/config.json``), i.e. the sidecar ``checkpoint/<stem>.config/`` folder
that ``engine/demo.py`` writes next to each tiny checkpoint; models are built on the meta device just to read
module names and shapes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

IMAGE_ENCODERS_DIR = "image_encoders"


@dataclass(frozen=True)
class LoraLayer:
    """One LoRA'd module: what the file stores and where it lands (for hand-merging in tests)."""

    key: str  # kohya module name, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    module: str  # module path inside that component (diffusers naming)
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """``alpha/rank * up @ down`` in the module's weight shape (the A1111 merge)."""
        up = self.up.flatten(1)
        down = self.down.flatten(1)
        merged = (up @ down) * (self.alpha / self.rank)
        return merged.reshape(self.up.shape[0], *self.down.shape[1:])


# ---- LoRA -------------------------------------------------------------------------------------------------------


def _sgm_unet_path(path: str, layers_per_block: int) -> str | None:
    """diffusers UNet module path -> SGM/LDM path as in kohya SDXL files; None where kohya's names do not map back."""
    parts = path.split(".")
    stride = layers_per_block + 1
    if parts[0] in ("down_blocks", "up_blocks") and parts[2] in ("resnets", "attentions"):
        block, kind, index = int(parts[1]), parts[2], int(parts[3])
        if parts[0] == "down_blocks":
            head = f"input_blocks.{block * stride + index + 1}"
        else:
            head = f"output_blocks.{block * stride + index}"
        rest = parts[4:]
    elif parts[0] == "mid_block" and parts[1] in ("resnets", "attentions"):
        kind, index = parts[1], int(parts[2])
        head = "middle_block.1" if kind == "attentions" else f"middle_block.{0 if index == 0 else 2}"
        return f"{head}.{_ldm_inner(parts[3:], kind)}"
    else:
        return None
    inner = "1" if kind == "attentions" else "0"
    return f"{head}.{inner}.{_ldm_inner(rest, kind)}"


def _ldm_inner(rest: list[str], kind: str) -> str:
    if kind == "resnets":
        return {"conv1": "in_layers.2", "conv2": "out_layers.3"}[rest[0]]
    return ".".join(rest)


def _unet_targets(unet: nn.Module, conv: bool) -> list[tuple[str, nn.Module]]:
    """Modules kohya trains: every Linear/1x1 conv in transformer blocks; with LoCon also resnet 3x3 convs."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in unet.named_modules():
        if ".attentions." in name and isinstance(module, nn.Linear | nn.Conv2d):
            if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
                continue
            out.append((name, module))
        elif conv and ".resnets." in name and name.rsplit(".", 1)[-1] in ("conv1", "conv2"):
            out.append((name, module))
    return out


def _te_targets(text_encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    suffixes = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    return [
        (name, module)
        for name, module in text_encoder.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name and name.rsplit(".", 1)[-1] in suffixes
    ]


def _random_pair(module: nn.Module, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    out_ch, in_ch = int(weight.shape[0]), int(weight.shape[1])
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        down = torch.randn(rank, in_ch, kh, kw, generator=gen) / (in_ch * kh * kw) ** 0.5
        up = torch.randn(out_ch, rank, 1, 1, generator=gen) / rank**0.5
    else:
        down = torch.randn(rank, in_ch, generator=gen) / in_ch**0.5
        up = torch.randn(out_ch, rank, generator=gen) / rank**0.5
    return down, up


def lora_layers(
    unet: nn.Module,
    text_encoders: Sequence[nn.Module],
    *,
    sdxl: bool,
    rank: int = 4,
    alpha: float = 2.0,
    conv: bool = False,
    seed: int = 0,
) -> list[LoraLayer]:
    """Random LoRA layers for a UNet and its text encoder(s), named as kohya names them for that base model."""
    gen = torch.Generator().manual_seed(seed)
    layers_per_block = int(getattr(unet, "config", {}).get("layers_per_block", 2))
    layers: list[LoraLayer] = []
    for path, module in _unet_targets(unet, conv):
        kohya_path = _sgm_unet_path(path, layers_per_block) if sdxl else path
        if kohya_path is None:
            continue
        down, up = _random_pair(module, rank, gen)
        layers.append(LoraLayer("lora_unet_" + kohya_path.replace(".", "_"), "unet", path, down, up, alpha))
    if sdxl:
        prefixes = [("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")]
    else:
        prefixes = [("lora_te_", "text_encoder")]
    for (prefix, component), encoder in zip(prefixes, text_encoders, strict=False):  # [] = UNet only
        for path, module in _te_targets(encoder):
            down, up = _random_pair(module, rank, gen)
            layers.append(LoraLayer(prefix + path.replace(".", "_"), component, path, down, up, alpha))
    return layers


def save_kohya_lora(path: Path, layers: Sequence[LoraLayer], metadata: dict[str, str] | None = None) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        tensors[f"{layer.key}.lora_down.weight"] = layer.down.contiguous()
        tensors[f"{layer.key}.lora_up.weight"] = layer.up.contiguous()
        tensors[f"{layer.key}.alpha"] = torch.tensor(float(layer.alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", **(metadata or {})})
    return path


def save_peft_lora(path: Path, layers: Sequence[LoraLayer]) -> Path:
    """diffusers/PEFT layout; linear layers only (PEFT's conv LoRA keys have the same names, kept simple here)."""
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        if layer.down.dim() != 2:
            continue
        prefix = f"{layer.component}.{layer.module}"
        tensors[f"{prefix}.lora_A.weight"] = layer.down.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = (layer.up * (layer.alpha / layer.rank)).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


# ---- textual inversion ------------------------------------------------------------------------------------------


def random_vectors(count: int, dim: int, seed: int, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)) * scale


def save_a1111_embedding_pt(path: Path, vectors: torch.Tensor, name: str | None = None) -> Path:
    """The dict A1111's textual-inversion trainer saves (``modules/textual_inversion``): ``string_to_param["*"]``."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors.clone().requires_grad_(True)},
        "name": name or path.stem,
        "step": 1000,
        "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "tiny",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, str(path))
    return path


def save_a1111_embedding_safetensors(path: Path, vectors: torch.Tensor, name: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": vectors.contiguous()}, str(path), metadata={"name": name or path.stem})
    return path


def save_sdxl_embedding(path: Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, str(path))
    return path


# ---- IP-Adapter -------------------------------------------------------------------------------------------------


def tiny_image_encoder(projection_dim: int, seed: int = 0) -> Any:
    """A tiny ``CLIPVisionModelWithProjection`` (real ones: ViT-H/14 for SD 1.5, ViT-bigG/14 for SDXL)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    params: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": projection_dim,
    }
    config = CLIPVisionConfig(**params)
    return CLIPVisionModelWithProjection(config).eval()


def ip_adapter_state(
    unet: Any, image_embed_dim: int, seed: int = 0, num_tokens: int = 4
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": ..., "ip_adapter": ...}`` as in ``ip-adapter_sd15.bin``: an ImageProjection (proj + norm) and
    ``to_k_ip`` / ``to_v_ip`` per cross-attention processor, numbered 1, 3, 5... in ``attn_processors`` order."""
    gen = torch.Generator().manual_seed(seed)
    cross_dim = int(unet.config.cross_attention_dim)
    image_proj = {
        "proj.weight": torch.randn(cross_dim * num_tokens, image_embed_dim, generator=gen) / image_embed_dim**0.5,
        "proj.bias": torch.zeros(cross_dim * num_tokens),
        "norm.weight": torch.ones(cross_dim),
        "norm.bias": torch.zeros(cross_dim),
    }
    ip: dict[str, torch.Tensor] = {}
    index = 0
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            index += 1
            continue
        attn = unet.get_submodule(name.removesuffix(".processor"))
        inner, kv_in = attn.to_k.weight.shape
        ip[f"{index}.to_k_ip.weight"] = torch.randn(inner, kv_in, generator=gen) / kv_in**0.5
        ip[f"{index}.to_v_ip.weight"] = torch.randn(inner, kv_in, generator=gen) / kv_in**0.5
        index += 1
    return {"image_proj": image_proj, "ip_adapter": ip}


def save_ip_adapter(path: Path, state: dict[str, dict[str, torch.Tensor]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        flat = {f"{group}.{key}": t.contiguous() for group, part in state.items() for key, t in part.items()}
        save_file(flat, str(path))
    else:
        torch.save(state, str(path))
    return path


# ---- the demo set -----------------------------------------------------------------------------------------------


def meta_models(config_dir: Path, sdxl: bool) -> tuple[nn.Module, list[nn.Module]]:
    """UNet and text encoder(s) of a diffusers config tree on the meta device: names and shapes, no memory."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((config_dir / "unet" / "config.json").read_text()))
        encoders: list[nn.Module] = [CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))]
        if sdxl:
            te2_config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2")
            encoders.append(CLIPTextModelWithProjection(te2_config))
    return unet, encoders


def _embedding_dims(encoders: Sequence[nn.Module]) -> list[int]:
    return [int(e.get_input_embeddings().weight.shape[1]) for e in encoders]  # type: ignore[operator]


def write_demo_adapters(models_dir: Path, sd15_config: Path | None, sdxl_config: Path | None) -> list[Path]:
    """Write a small demo set into ``models_dir/{lora,textualinversion,ipadapter}``, sized from the given config
    trees (normally ``models_dir/checkpoint/<tiny checkpoint stem>.config``). Deterministic; returns the paths."""
    written: list[Path] = []
    lora_dir, ti_dir, ip_dir = models_dir / "lora", models_dir / "textualinversion", models_dir / "ipadapter"
    for config_dir, sdxl in ((sd15_config, False), (sdxl_config, True)):
        if config_dir is None:
            continue
        tag = "sdxl" if sdxl else "sd15"
        unet, encoders = meta_models(config_dir, sdxl)
        layers = lora_layers(unet, encoders, sdxl=sdxl, conv=True, seed=1)
        written.append(save_kohya_lora(lora_dir / f"tiny-detail-{tag}.safetensors", layers))
        written.append(
            save_kohya_lora(
                lora_dir / f"tiny-style-{tag}.safetensors",
                lora_layers(unet, encoders, sdxl=sdxl, seed=2, rank=2, alpha=1.0),
            )
        )
        dims = _embedding_dims(encoders)
        if sdxl:
            written.append(
                save_sdxl_embedding(
                    ti_dir / "tiny-negative-sdxl.safetensors",
                    random_vectors(2, dims[0], 11),
                    random_vectors(2, dims[1], 12),
                )
            )
        else:
            written.append(
                save_peft_lora(lora_dir / "tiny-peft-sd15.safetensors", lora_layers(unet, encoders, sdxl=False, seed=3))
            )
            written.append(save_a1111_embedding_pt(ti_dir / "tiny-subject-sd15.pt", random_vectors(3, dims[0], 13)))
            written.append(
                save_a1111_embedding_safetensors(
                    ti_dir / "tiny-easynegative-sd15.safetensors", random_vectors(2, dims[0], 14)
                )
            )
        encoder = tiny_image_encoder(projection_dim=32, seed=21 if sdxl else 20)
        encoder.save_pretrained(ip_dir / IMAGE_ENCODERS_DIR / tag)
        written.append(ip_dir / IMAGE_ENCODERS_DIR / tag)
        state = ip_adapter_state(unet, image_embed_dim=32, seed=22 if sdxl else 23)
        written.append(save_ip_adapter(ip_dir / f"ip-adapter_{tag}.bin", state))
    return written
