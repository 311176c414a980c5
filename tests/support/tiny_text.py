"""Tiny random-weight CLIP text encoders and the real CLIP tokenizer, for conditioning tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from underpaint.engine.conditioning import TextEncoderBundle

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "src" / "underpaint" / "engine" / "configs" / "clip_tokenizer"


def text_config(hidden: int, projection: int | None = None, layers: int = 5) -> CLIPTextConfig:
    values: dict[str, Any] = {  # CLIPTextConfig declares its fields through **kwargs
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": projection or hidden,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    return CLIPTextConfig(**values)


def tokenizer() -> CLIPTokenizer:
    loaded: CLIPTokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    return loaded


def tokenizer_pad_bang(tmp_dir: Path) -> CLIPTokenizer:
    """SDXL's second tokenizer: same BPE, pad token "!" (id 0)."""
    target = tmp_dir / "tokenizer_2"
    shutil.copytree(TOKENIZER_DIR, target)
    shutil.copyfile(target / "tokenizer_config_pad_bang.json", target / "tokenizer_config.json")
    # special_tokens_map.json (pad = EOS) would override the config's pad token, so it has to go.
    (target / "special_tokens_map.json").unlink()
    loaded: CLIPTokenizer = CLIPTokenizer.from_pretrained(target)
    return loaded


def text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    model = CLIPTextModel(text_config(32))
    model.eval()  # type: ignore[no-untyped-call]
    return model


def text_encoder_with_projection(seed: int = 1) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(text_config(64, projection=48))
    model.eval()  # type: ignore[no-untyped-call]
    return model


def sd15_bundle() -> TextEncoderBundle:
    return TextEncoderBundle(tokenizers=[tokenizer()], text_encoders=[text_encoder()], is_sdxl=False)


def sdxl_bundle(tmp_dir: Path) -> TextEncoderBundle:
    return TextEncoderBundle(
        tokenizers=[tokenizer(), tokenizer_pad_bang(tmp_dir)],
        text_encoders=[text_encoder(), text_encoder_with_projection()],
        is_sdxl=True,
    )
