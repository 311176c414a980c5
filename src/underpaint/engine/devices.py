"""Device and dtype policy.

fp16 on CUDA (bf16 on request), float32 on CPU: CPU half kernels are slow or missing and bf16 changes results.
Attention stays on diffusers' default, torch 2's scaled_dot_product_attention.
"""

from __future__ import annotations

import torch


def pick_device(setting: str = "auto") -> torch.device:
    """``"auto"`` = CUDA when available, else CPU; anything else is passed to ``torch.device`` and checked."""
    choice = (setting or "auto").strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError as exc:
        raise ValueError(f"invalid device setting {setting!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {setting!r} requested but MPS is not available")
    return device


def pick_dtype(device: torch.device, prefer_bf16: bool = False) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if prefer_bf16 and torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def configure_torch_threads(n: int | None) -> None:
    """Pin the intra-op thread count (results depend on it, field notes 11). ``None`` keeps torch's default."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"torch_threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def empty_device_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
