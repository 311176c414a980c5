"""Upscaler models (ESRGAN, Real-ESRGAN, SRVGG compact, SwinIR, HAT, DAT, ...) loaded with spandrel, run tiled, with
A1111's "Extras" semantics. Used by ``POST /v3/async/upscale`` and by hires fix.

Loading (``load_upscaler``): the file is read by ``engine.weights`` (safetensors, or a pickle through
``torch.load(weights_only=True)``: no pickled code runs, unlike spandrel's own ``load_from_file``, which would also
run TorchScript ``.pt`` files), spandrel canonicalises the state dict (``params_ema``/``params``/``state_dict``
nesting, ``module.`` prefixes) and detects the architecture and its hyper-parameters from the keys. Anything that
goes wrong (unreadable file, unknown architecture, an inpainting model, a model that is not RGB to RGB) raises
``UpscalerError``, a ``JobError``: the worker fails the task with its message.

Running (``run_model``): the image is cut into tiles of at most ``TILE`` x ``TILE`` input pixels (the grid split
evenly); each tile is run with up to ``TILE_PAD`` pixels of the surrounding image as context on every side where
the image continues, and only the tile's own area of the output is kept. Memory is therefore bounded by one
``(TILE + 2 * TILE_PAD)``-pixel window at any input size, and a model whose receptive field is within ``TILE_PAD``
input pixels gives exactly its whole-image output (tests/engine/test_upscalers.py checks this against spandrel run
on the whole image). A1111 (>= 1.8) uses the same 192 px tiles and 8 px ``ESRGAN_tile_overlap`` but blends
overlapping tile outputs with linear ramps (its ``split_grid``/``combine_grid``); context-and-crop (Real-ESRGAN's
own ``tile_pad`` method) leaves no blend zone where two tiles' predictions mix. Models that spandrel marks as
tiling internally (``ModelTiling.INTERNAL``) run on the whole image.

Pixels: RGB in ``[0, 1]`` (the channel order the models were trained on, what spandrel documents and what
Real-ESRGAN's and chaiNNer's inference feed; A1111 flips to BGR before the model), 8 bits between passes and at the
end, truncated as A1111's ``torch_bgr_to_pil_image`` truncates. No alpha: images reach the engine as RGB (the
API's decoder composites transparency on white; A1111's Extras drops it).

A1111 semantics (``modules/upscaler.py`` ``Upscaler.upscale``, v1.6-v1.10): the destination is
``int(w * scale // 8 * 8)`` x ``int(h * scale // 8 * 8)`` (``tasks.contract.extras_size``); the model runs up to 3 times while the
image is smaller than the destination (always once first when ``scale == 1``; stopping if a pass does not change the
size), then a Lanczos resize to the destination if the size differs. ``upscale_to`` is A1111's ``resize_image``
"just resize" with an upscaler (what hires fix calls): scale ``max(W / w, H / h)``, the above when that is > 1, then
Lanczos to exactly ``W`` x ``H``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from spandrel import (
    ImageModelDescriptor,
    ModelLoader,
    ModelTiling,
    UnsupportedModelError,
    canonicalize_state_dict,
)

from underpaint.engine.adapters import short_reason
from underpaint.engine.job import JobCancelled, JobError
from underpaint.engine.lru import LoadedLru, logged_load
from underpaint.engine.weights import ModelLoadError, read_weights_mapping
from underpaint.tasks.contract import extras_size

TILE = 192
TILE_PAD = 8
MAX_PASSES = 3
LANCZOS = Image.Resampling.LANCZOS

TileProgress = Callable[[int, int], None]  # (tiles done, tiles in this pass)


class UpscalerError(JobError):
    """An upscaler file that cannot be used: unreadable, unsafe, not an architecture spandrel knows, or not an
    RGB -> RGB image model."""


@dataclass(frozen=True)
class LoadedUpscaler:
    name: str
    descriptor: ImageModelDescriptor[Any]

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    @property
    def architecture(self) -> str:
        return str(self.descriptor.architecture.name)

    @property
    def tiled(self) -> bool:
        return bool(self.descriptor.tiling != ModelTiling.INTERNAL)


def load_upscaler(path: Path, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> LoadedUpscaler:
    """The model in ``path`` on ``device``, in ``dtype`` where the architecture supports it (else float32)."""
    path = Path(path)
    try:
        raw = read_weights_mapping(path)
        state = canonicalize_state_dict(dict(raw))
        descriptor = ModelLoader().load_from_state_dict(state)
    except ModelLoadError as exc:
        raise UpscalerError(f"upscaler {exc}") from exc  # the message starts with the file name
    except UnsupportedModelError:
        raise UpscalerError(
            f"upscaler {path.name}: not a model architecture spandrel recognises (ESRGAN, Real-ESRGAN, SRVGG "
            "compact, SwinIR, HAT, DAT, ...)"
        ) from None
    except Exception as exc:  # spandrel's architecture code raises anything on a damaged or odd state dict
        raise UpscalerError(f"upscaler {path.name}: spandrel could not build the model: {short_reason(exc)}") from exc
    if not isinstance(descriptor, ImageModelDescriptor):
        raise UpscalerError(f"upscaler {path.name}: a {descriptor.purpose} model, not an image-to-image upscaler")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise UpscalerError(
            f"upscaler {path.name}: takes {descriptor.input_channels} and gives {descriptor.output_channels} "
            "channels; only RGB -> RGB models are supported"
        )
    supported = (
        dtype == torch.float32
        or (dtype == torch.float16 and descriptor.supports_half)
        or (dtype == torch.bfloat16 and descriptor.supports_bfloat16)
    )
    descriptor.to(device or torch.device("cpu"), dtype if supported else torch.float32)
    descriptor.eval()
    return LoadedUpscaler(name=path.stem, descriptor=descriptor)


class UpscalerCache:
    """Loaded upscalers, least recently used first out, keyed by file version (path, mtime, size): a replaced file
    is loaded again. Thread-safe; an upscaler is small (ESRGAN x4: 67 MB), so a count bounds it."""

    def __init__(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32, capacity: int = 2):
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self._lru: LoadedLru[tuple[str, float, int], LoadedUpscaler] = LoadedLru(capacity)

    @property
    def loads(self) -> int:
        return self._lru.loads

    def get(self, path: Path) -> LoadedUpscaler:
        path = Path(path)
        try:
            st = path.stat()
        except OSError as exc:
            raise UpscalerError(f"upscaler {path.name} is gone from the models folder: {exc}") from exc
        key = (str(path.resolve()), st.st_mtime, st.st_size)
        return self._lru.get(
            key, lambda: logged_load("upscaler", path.name, lambda: load_upscaler(path, self.device, self.dtype))
        )

    def clear(self) -> None:
        self._lru.clear()


def _spans(length: int, tile: int) -> list[tuple[int, int]]:
    """``length`` split into ``ceil(length / tile)`` near-equal consecutive spans."""
    count = max(1, -(-length // tile))
    edges = [round(i * length / count) for i in range(count + 1)]
    return list(itertools.pairwise(edges))


def run_model(
    model: LoadedUpscaler,
    image: torch.Tensor,
    *,
    tile: int = TILE,
    pad: int = TILE_PAD,
    on_tile: TileProgress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """One pass of the model over ``image`` (``(1, 3, H, W)``: float in ``[0, 1]``, or uint8 levels), computed tile
    by tile (module docstring; ``tile <= 0`` runs the whole image at once): ``(1, 3, H * s, W * s)`` on the CPU,
    float32 for a float input, uint8 (truncated, as A1111 does) for a uint8 one, so that an 8-bit pass never holds
    a float copy of the whole image. Raises ``JobCancelled`` between tiles when ``should_cancel()`` says so."""
    levels = image.dtype == torch.uint8
    descriptor = model.descriptor
    s = model.scale
    _, _, height, width = image.shape
    if tile <= 0 or not model.tiled:
        rows, cols = [(0, height)], [(0, width)]
    else:
        rows, cols = _spans(height, tile), _spans(width, tile)
    out = torch.empty((1, 3, height * s, width * s), dtype=torch.uint8 if levels else torch.float32)
    total = len(rows) * len(cols)
    done = 0
    with torch.inference_mode():
        for y0, y1 in rows:
            for x0, x1 in cols:
                if should_cancel is not None and should_cancel():
                    raise JobCancelled()
                wy0, wy1 = max(0, y0 - pad), min(height, y1 + pad)
                wx0, wx1 = max(0, x0 - pad), min(width, x1 + pad)
                window = image[:, :, wy0:wy1, wx0:wx1].float()
                if levels:
                    window = window / 255.0
                result = descriptor(window.to(descriptor.device, descriptor.dtype))
                oy, ox = (y0 - wy0) * s, (x0 - wx0) * s
                crop = result[:, :, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s].float().cpu()
                out[:, :, y0 * s : y1 * s, x0 * s : x1 * s] = _truncate(crop) if levels else crop
                done += 1
                if on_tile is not None:
                    on_tile(done, total)
    return out


def _truncate(tensor: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` -> uint8 levels, truncating as A1111 does (numpy's ``astype(np.uint8)``)."""
    return (tensor.clamp(0, 1) * 255.0).to(torch.uint8)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An image as ``(1, 3, H, W)`` float32 RGB in ``[0, 1]``."""
    return image_levels(image).float() / 255.0


def image_levels(image: Image.Image) -> torch.Tensor:
    """An image as ``(1, 3, H, W)`` uint8 RGB."""
    array = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def levels_to_image(tensor: torch.Tensor) -> Image.Image:
    """``(1, 3, H, W)`` uint8 -> an RGB image."""
    return Image.fromarray(tensor[0].permute(1, 2, 0).contiguous().numpy(), "RGB")


def model_pass(
    model: LoadedUpscaler,
    image: Image.Image,
    *,
    tile: int = TILE,
    pad: int = TILE_PAD,
    on_tile: TileProgress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Image.Image:
    """One 8-bit -> 8-bit pass of the model (A1111's ``do_upscale``)."""
    result = run_model(model, image_levels(image), tile=tile, pad=pad, on_tile=on_tile, should_cancel=should_cancel)
    return levels_to_image(result)


def upscale(
    image: Image.Image,
    model: LoadedUpscaler,
    scale: float,
    *,
    tile: int = TILE,
    pad: int = TILE_PAD,
    on_pass: Callable[[int], None] | None = None,
    on_progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Image.Image:
    """A1111's Extras upscale by ``scale``: the result is ``extras_size(w, h, scale)`` (module docstring).
    ``on_pass(i)`` is called before model pass ``i`` (0-based), ``on_progress(fraction)`` after each tile."""
    dest_w, dest_h = extras_size(image.width, image.height, scale)
    if dest_w < 1 or dest_h < 1:
        raise JobError(f"upscaling {image.width}x{image.height} by {scale} gives an empty image")
    passes = max(1, passes_needed(image.width, image.height, scale, model.scale))
    image = image.convert("RGB")
    for i in range(MAX_PASSES):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        before = image.size
        if on_pass is not None:
            on_pass(i)

        def on_tile(done: int, total: int, index: int = i) -> None:
            if on_progress is not None:
                on_progress(min(1.0, (index + done / total) / passes))

        image = model_pass(model, image, tile=tile, pad=pad, on_tile=on_tile, should_cancel=should_cancel)
        if image.size == before:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=LANCZOS)
    return image


def upscale_to(
    image: Image.Image,
    model: LoadedUpscaler,
    width: int,
    height: int,
    *,
    tile: int = TILE,
    pad: int = TILE_PAD,
    should_cancel: Callable[[], bool] | None = None,
) -> Image.Image:
    """Exactly ``width`` x ``height`` (A1111's ``resize_image`` "just resize" with an upscaler, used by hires fix):
    the Extras upscale by ``max(width / w, height / h)`` when that is above 1, then Lanczos to the size."""
    scale = max(width / image.width, height / image.height)
    image = image.convert("RGB")
    if scale > 1.0:
        image = upscale(image, model, scale, tile=tile, pad=pad, should_cancel=should_cancel)
    if image.size != (width, height):
        image = image.resize((width, height), resample=LANCZOS)
    return image


def passes_needed(width: int, height: int, scale: float, model_scale: int) -> int:
    """How many model passes ``upscale`` runs for an image of this size (for progress and memory estimates)."""
    dest_w, dest_h = extras_size(width, height, scale)
    passes = 0
    for i in range(MAX_PASSES):
        if width >= dest_w and height >= dest_h and (i > 0 or scale != 1):
            break
        if model_scale == 1:
            return passes + 1
        width, height, passes = width * model_scale, height * model_scale, passes + 1
    return passes
