"""Device and dtype policy.

``dtype = "auto"``: fp16 on CUDA and MPS, float32 on CPU (CPU half kernels are slow, and half changes results).
``float32`` / ``float16`` / ``bfloat16`` force one everywhere. The VAE follows ``vae_dtype`` (``auto`` = the model
dtype, except that a VAE whose config asks for ``force_upcast`` -- SDXL's -- runs in float32 under fp16).
Attention stays on diffusers' default, torch 2's scaled_dot_product_attention.
"""

from __future__ import annotations

import ctypes

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


DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(setting: str) -> torch.dtype | None:
    """``"auto"`` -> None; a name of ``DTYPE_NAMES`` (also ``fp32``/``fp16``/``bf16``) -> that dtype."""
    choice = (setting or "auto").strip().lower()
    if choice == "auto":
        return None
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(choice, choice)
    if name not in DTYPE_NAMES:
        raise ValueError(f"invalid dtype setting {setting!r}: use auto, float32, float16 or bfloat16")
    return DTYPE_NAMES[name]


def pick_dtype(device: torch.device, setting: str = "auto") -> torch.dtype:
    """The weights' dtype: the setting when given, else fp16 on CUDA and MPS and float32 on CPU."""
    forced = parse_dtype(setting)
    if forced is not None:
        if forced == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"dtype bfloat16 requested but {torch.cuda.get_device_name(device)} does not support it")
        return forced
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.float32


def vae_dtype_for(model_dtype: torch.dtype, force_upcast: bool, setting: torch.dtype | None) -> torch.dtype:
    """The dtype a VAE runs in: ``setting`` when forced; else float32 for a ``force_upcast`` VAE (SDXL's overflows
    in fp16 and gives black images, encoder included), else the model dtype. bf16 has fp32's range: no upcast."""
    if setting is not None:
        return setting
    if model_dtype == torch.float16 and force_upcast:
        return torch.float32
    return model_dtype


def configure_torch_threads(n: int | None) -> None:
    """Pin the intra-op thread count (results depend on it, field notes 11). ``None`` keeps torch's default."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"torch_threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def empty_device_cache() -> None:
    """Give freed memory back after a model is evicted: the CUDA cache, and glibc's malloc arenas.

    Without ``malloc_trim`` the freed pages of an evicted checkpoint stay in the process (RSS grows with every
    model switch, the most common complaint against A1111 and Forge).
    """
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return
    libc.malloc_trim(0)
