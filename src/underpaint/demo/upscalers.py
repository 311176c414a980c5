"""Tiny random-weight upscalers in the real on-disk formats (tests, ``underpaint demo-models``).

Formats written into ``models/upscaler/``:

* ``RealESRGAN_x4plus_anime_6B.pth`` and ``RealESRNet_x4plus.pth``: Real-ESRGAN's RRDBNet as its releases store it,
  ``torch.save({"params_ema": state_dict})`` with BasicSR's key names (``conv_first``, ``body.N.rdbM.convK``,
  ``conv_body``, ``conv_up1``/``conv_up2``, ``conv_hr``, ``conv_last``), x4. Named as Novita's ``upscaler`` values so
  that hires fix and ``/v3/async/upscale`` resolve them (the registry matches a name to a file's stem).
* ``4x-tiny-esrgan.safetensors``: an RRDBNet in the "old-arch" ESRGAN layout most community models use
  (``model.0``, ``model.1.sub.N.RDBM.convK.0``, ``model.3``/``model.6`` up-convs, ``model.8``, ``model.10``), x4.
* ``2x-tiny-compact.pth``: Real-ESRGAN's SRVGGNetCompact (``realesr-general-x4v3`` style, ``{"params": ...}``,
  ``body.N`` convs and PReLUs), x2: a second scale, so that tests see several model passes.

The shapes are tiny (8 feature channels, one RRDB block; RRDBNet's growth channels stay 32, which is what spandrel
builds), the weights seeded random; spandrel detects each file's architecture, scale and sizes from its keys exactly
as it does for the released models. The last convolution's bias is 0.5, so outputs are mid-grey textures rather
than black after clamping to [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

StateDict = dict[str, torch.Tensor]

ANIME_6B = "RealESRGAN_x4plus_anime_6B.pth"
ESRNET = "RealESRNet_x4plus.pth"
OLD_ESRGAN = "4x-tiny-esrgan.safetensors"
COMPACT = "2x-tiny-compact.pth"

FEATURES = 8
GROWTH = 32
BLOCKS = 1
COMPACT_CONVS = 2


def _conv(gen: torch.Generator, out_ch: int, in_ch: int, bias: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn((out_ch, in_ch, 3, 3), generator=gen) / (in_ch * 9) ** 0.5
    return weight, torch.full((out_ch,), bias)


def _rrdb_new_layout(seed: int, blocks: int = BLOCKS, features: int = FEATURES) -> StateDict:
    """BasicSR's RRDBNet (x4) state dict, as Real-ESRGAN's releases name it."""
    gen = torch.Generator().manual_seed(seed)
    sd: StateDict = {}

    def put(name: str, out_ch: int, in_ch: int, bias: float = 0.0) -> None:
        sd[f"{name}.weight"], sd[f"{name}.bias"] = _conv(gen, out_ch, in_ch, bias)

    put("conv_first", features, 3)
    for b in range(blocks):
        for r in (1, 2, 3):
            for k in range(1, 5):
                put(f"body.{b}.rdb{r}.conv{k}", GROWTH, features + (k - 1) * GROWTH)
            put(f"body.{b}.rdb{r}.conv5", features, features + 4 * GROWTH)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        put(name, features, features)
    put("conv_last", 3, features, bias=0.5)
    return sd


def _old_arch(new: StateDict, blocks: int = BLOCKS) -> StateDict:
    """The same x4 RRDBNet under the old-arch ESRGAN names."""
    renames = {"conv_first": "model.0", "conv_body": f"model.1.sub.{blocks}", "conv_up1": "model.3"}
    renames |= {"conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}
    old: StateDict = {}
    for key, value in new.items():
        module, kind = key.rsplit(".", 1)
        if module.startswith("body."):
            _, b, rdb, conv = module.split(".")
            name = f"model.1.sub.{b}.RDB{rdb[3:]}.{conv}.0"
        else:
            name = renames[module]
        old[f"{name}.{kind}"] = value
    return old


def _compact(seed: int, scale: int = 2, features: int = FEATURES, convs: int = COMPACT_CONVS) -> StateDict:
    """SRVGGNetCompact: conv, PReLU, ``convs`` x (conv, PReLU), conv to ``3 * scale**2`` channels (pixel shuffle)."""
    gen = torch.Generator().manual_seed(seed)
    sd: StateDict = {}
    sd["body.0.weight"], sd["body.0.bias"] = _conv(gen, features, 3)
    sd["body.1.weight"] = torch.full((features,), 0.25)
    for i in range(convs):
        sd[f"body.{2 + 2 * i}.weight"], sd[f"body.{2 + 2 * i}.bias"] = _conv(gen, features, features)
        sd[f"body.{3 + 2 * i}.weight"] = torch.full((features,), 0.25)
    last = 2 + 2 * convs
    # Small: the network adds this residual to the nearest-upscaled input.
    weight, bias = _conv(gen, 3 * scale * scale, features)
    sd[f"body.{last}.weight"], sd[f"body.{last}.bias"] = weight * 0.2, bias
    return sd


def write_demo_upscalers(models_dir: Path) -> dict[str, Path]:
    """Write the tiny upscalers into ``models_dir/upscaler/`` and return their paths by ``upscaler/<file>``."""
    folder = Path(models_dir) / "upscaler"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in (ANIME_6B, ESRNET, OLD_ESRGAN, COMPACT)}
    torch.save({"params_ema": _rrdb_new_layout(seed=5100)}, paths[ANIME_6B])
    torch.save({"params_ema": _rrdb_new_layout(seed=5200)}, paths[ESRNET])
    old = {k: v.contiguous() for k, v in _old_arch(_rrdb_new_layout(seed=5300)).items()}
    safetensors.torch.save_file(old, str(paths[OLD_ESRGAN]), {"format": "pt"})
    torch.save({"params": _compact(seed=5400)}, paths[COMPACT])
    return {f"upscaler/{name}": path for name, path in paths.items()}
