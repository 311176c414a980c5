"""A1111's resize of the UNet's upsampled feature maps at sizes that are not multiples of 64.

The UNet halves the latent three times (SD 1.5, SDXL twice) on the way down; a side that does not divide evenly
is rounded up by each stride-2 convolution, so on the way up ``2 x`` the coarser map can differ from the skip
connection it is concatenated with. A1111 (its ``sd_hijack_unet``, "TorchHijackForUnet") upsamples x2 (nearest),
runs the upsampler's convolution, and then, where the concatenation finds two sizes, resizes the upsampled map to
the skip connection's size with nearest interpolation. diffusers' ``UNet2DConditionModel`` instead interpolates
straight to the skip size before the convolution (``Upsample2D(output_size=...)``). The two differ wherever the
sizes do not divide (up to 72 8-bit levels at 200x150).

``use_a1111_skip_resize(unet)`` installs hooks on the UNet's upsamplers that give A1111's order: the upsampler
runs as for an even size (x2, then its convolution) and its output is resized (nearest) to the size diffusers asked
for, which is the next skip connection's. At multiples of 64 diffusers passes no size and nothing changes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D

_TARGET = "_a1111_skip_size"
_INSTALLED = "_a1111_skip_resize"


def _before(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    size = kwargs.pop("output_size", None)
    if len(args) > 1:
        size, args = args[1], (args[0], *args[2:])
    setattr(module, _TARGET, None if size is None else tuple(int(v) for v in size))
    return args, kwargs


def _after(module: torch.nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    size = getattr(module, _TARGET, None)
    setattr(module, _TARGET, None)
    if size is None or tuple(output.shape[-2:]) == size:
        return output
    return F.interpolate(output, size=size, mode="nearest")


def use_a1111_skip_resize(unet: torch.nn.Module) -> int:
    """Install the hooks on every ``Upsample2D`` of ``unet`` (once; later calls do nothing). Returns how many
    upsamplers carry them."""
    count = 0
    for module in unet.modules():
        if isinstance(module, Upsample2D) and not module.use_conv_transpose:
            if not getattr(module, _INSTALLED, False):
                module.register_forward_pre_hook(_before, with_kwargs=True)
                module.register_forward_hook(_after)
                setattr(module, _INSTALLED, True)
            count += 1
    return count
