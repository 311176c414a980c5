"""GPU speed options: ``torch.compile`` of the UNet and the channels_last memory format.

Compile (``compile = true``) wraps the UNet module in place (``nn.Module.compile``), so every holder of the module
(the pipe, the LoRA and IP-Adapter managers) sees the compiled one. ``dynamic=False``: each latent shape and batch
size (the shape bucket) gets its own graph on first use, and later tasks of that bucket reuse it. A prompt enters
as a tensor of fixed shape; LoRA deltas enter through the forward hooks as tensors (``adapters/lora.py``), with
the strength folded into them, so a new LoRA set or strength re-runs the same graph. Recompiles happen on a new
shape bucket, a change in the number of active LoRAs on a layer (0, 1, 2 ...), a different LoRA rank, and an
IP-Adapter being attached or removed (it swaps attention processors).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

# The executor's default; tests on CPU pass "eager"/"aot_eager" or a counting backend (inductor on 2 CPU cores
# takes minutes per graph).
DEFAULT_BACKEND = "inductor"
# Graphs kept per compiled UNet forward before dynamo falls back to eager: many sizes x adapter layouts.
RECOMPILE_LIMIT = 64


def compile_unet(unet: Any, backend: str | Callable[..., Any] = DEFAULT_BACKEND) -> None:
    """Compile ``unet`` in place once (idempotent)."""
    if getattr(unet, "_underpaint_compiled", False):
        return
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, RECOMPILE_LIMIT * 4)
    chosen = backend
    unet.compile(backend=chosen, dynamic=False)
    unet._underpaint_compiled = True
    log.info("UNet compiled with torch.compile (backend %s); each new image size compiles on first use", chosen)


def use_channels_last(*modules: Any) -> None:
    """channels_last for conv-heavy modules (CUDA: cuDNN's fast NHWC kernels under half precision)."""
    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)
