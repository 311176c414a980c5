"""Inpainting's image side, with A1111 v1.8 semantics: the mask, the area that is processed, the latent mask, and
the paste-back that keeps every unmasked pixel of the input.

Written from the published method (A1111 is AGPL; nothing is copied):

1. The mask (``job.MaskSpec.mask``, already reduced to one channel by ``wire.images.mask_channel``: alpha > 128 where
   the file has real alpha, else luminance with its grey levels) is inverted if asked, then blurred with OpenCV's
   Gaussian, sigma = ``mask_blur`` and kernel ``2 * int(2.5 * sigma + 0.5) + 1``: one horizontal pass, then one
   vertical pass, each rounded to 8 bits, as A1111 applies its separate x and y blurs.
2. Whole picture: the image and the mask are resized ("just resize", Lanczos) to the processing size; the overlay
   mask is the blurred mask doubled and clipped. Only masked (``full_res``): the bounding box of the blurred mask
   plus ``padding``, clipped to the image, grown to the processing aspect ratio (shifted back inside the image when
   it sticks out), is cropped from image and mask and resized to the processing size ("resize and fill"); the
   overlay mask is the blurred mask itself.
3. Masked content "original": the masked area starts from the input's own pixels (A1111's UI default).
4. The latent mask is the processing mask resized to latent size (Pillow's default bicubic) and rounded; the
   sampler keeps ``1 - latent mask`` from the un-noised init latent (``samplers.LatentBlend``).
5. 9-channel checkpoints get ``[mask, VAE(image * (1 - mask))]`` (the processing mask rounded, nearest-resized to
   latent size) as extra UNet input.
6. After decoding: only masked resizes the result back to the crop ("crop and resize") and places it on a
   transparent canvas of the input's size; then the input, made transparent where the overlay mask is set, is
   alpha-composited over it. Where the overlay mask is 0, the output is the input, byte for byte.

The processing size (the job's width x height) is the input's size rounded down to a multiple of 8 (the VAE's
factor; ``tasks.contract.inpainting_size``, set at submit). When that differs from
the input's size (an input whose sides are not multiples of 8), the whole-picture result is resized back to the
input's size (Lanczos) before the paste-back and the overlay is built at the input's size, so the output always has
the input's size and its unmasked pixels stay exact (A1111 itself cannot composite such sizes; docs/compatibility.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from underpaint.engine.job import JobError, MaskSpec

LATENT_FACTOR = 8


@dataclass(frozen=True)
class PreparedArea:
    """The result of step 1-2: what the sampler works on, and how its result goes back into the input."""

    image: Image.Image  # RGB, processing size: the init image
    mask: Image.Image  # L, processing size: the latent and conditioning masks come from it
    overlay: Image.Image  # RGBA, input size: the input, transparent where it is repainted
    crop: tuple[int, int, int, int] | None  # (x1, y1, x2, y2) for only masked, else None
    size: tuple[int, int]  # the input's (width, height): the output's size


def blur_kernel_size(sigma: float) -> int:
    return 2 * int(2.5 * sigma + 0.5) + 1


def blur_mask(mask: Image.Image, sigma: int) -> Image.Image:
    """OpenCV Gaussian blur of an 8-bit mask: a horizontal pass, then a vertical pass (8 bits in between)."""
    if sigma <= 0:
        return mask
    k = blur_kernel_size(sigma)
    arr = np.asarray(mask.convert("L"))
    arr = cv2.GaussianBlur(arr, (k, 1), sigma)
    arr = cv2.GaussianBlur(arr, (1, k), sigma)
    return Image.fromarray(arr, "L")


def user_mask(spec: MaskSpec) -> Image.Image:
    """Step 1: the mask inverted if asked, then blurred."""
    mask = spec.mask.convert("L")
    if spec.invert:
        mask = ImageOps.invert(mask)
    return blur_mask(mask, spec.blur)


def mask_bbox(mask: Image.Image, padding: int) -> tuple[int, int, int, int]:
    """The smallest box holding every non-zero pixel, grown by ``padding`` and clipped to the image."""
    box = mask.getbbox()
    w, h = mask.size
    if box is None:
        x1, y1, x2, y2 = w, h, 0, 0
    else:
        x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, w), min(y2 + padding, h)


def _grow(lo: int, hi: int, extra: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) by ``extra`` split evenly (the odd pixel after), moved back inside [0, limit)."""
    lo -= extra // 2
    hi += extra - extra // 2
    if hi >= limit:
        shift = hi - limit
        hi -= shift
        lo -= shift
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def fit_aspect(
    box: tuple[int, int, int, int], width: int, height: int, image_w: int, image_h: int
) -> tuple[int, int, int, int]:
    """Grow the crop box along its short side to the processing aspect ``width / height``."""
    x1, y1, x2, y2 = box
    box_ratio = (x2 - x1) / (y2 - y1)
    target = width / height
    if box_ratio > target:
        extra = int((x2 - x1) / target - (y2 - y1))
        y1, y2 = _grow(y1, y2, extra, image_h)
    else:
        extra = int((y2 - y1) * target - (x2 - x1))
        x1, x2 = _grow(x1, x2, extra, image_w)
    return x1, y1, x2, y2


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """ "Resize and fill": fit inside ``width x height`` keeping the aspect ratio, centred, and fill the two empty
    bands by stretching the image's outermost row (or column) of pixels."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    fitted = image.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(fitted, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        band = height // 2 - src_h // 2
        if band > 0:
            top = fitted.resize((width, band), box=(0, 0, width, 0))
            bottom = fitted.resize((width, band), box=(0, fitted.height, width, fitted.height))
            out.paste(top, (0, 0))
            out.paste(bottom, (0, band + src_h))
    elif ratio > src_ratio:
        band = width // 2 - src_w // 2
        if band > 0:
            left = fitted.resize((band, height), box=(0, 0, 0, height))
            right = fitted.resize((band, height), box=(fitted.width, 0, fitted.width, height))
            out.paste(left, (0, 0))
            out.paste(right, (band + src_w, 0))
    return out


def resize_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """ "Crop and resize": scale to cover ``width x height`` keeping the aspect ratio, centred, cut the excess."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    scaled = image.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(scaled, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def _overlay(image: Image.Image, overlay_mask: Image.Image) -> Image.Image:
    """The input with alpha ``255 - overlay_mask``, built as A1111 builds it: pasted through the inverted mask onto
    a transparent premultiplied (RGBa) canvas, then un-premultiplied."""
    canvas = Image.new("RGBa", image.size)
    canvas.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
    return canvas.convert("RGBA")


def _checked(mask: Image.Image) -> Image.Image:
    if mask.getbbox() is None:
        raise JobError("the mask is empty: there is nothing to inpaint")
    return mask


def area_cropper(
    size: tuple[int, int], spec: MaskSpec, width: int, height: int
) -> Callable[[Image.Image], Image.Image]:
    """For only masked: cut another image (a ControlNet unit's, resized to the init image's ``size`` first) to the
    area the init image is cut to, at the processing size; the whole-picture case needs nothing."""
    mask = _checked(user_mask(spec))
    box = fit_aspect(mask_bbox(mask, spec.full_res_padding), width, height, size[0], size[1])

    def crop(image: Image.Image) -> Image.Image:
        if image.size != size:
            image = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        return resize_fill(image.convert("RGB").crop(box), width, height)

    return crop


def prepare_area(image: Image.Image, spec: MaskSpec, width: int, height: int) -> PreparedArea:
    """Steps 1-2 for one input ``image`` (RGB) at the processing size ``width x height``."""
    if spec.mask.size != image.size:
        raise JobError(f"the mask is {spec.mask.size[0]}x{spec.mask.size[1]}, the image {image.width}x{image.height}")
    mask = _checked(user_mask(spec))
    image = image.convert("RGB")
    if spec.full_res:
        box = fit_aspect(mask_bbox(mask, spec.full_res_padding), width, height, image.width, image.height)
        return PreparedArea(
            image=resize_fill(image.crop(box), width, height),
            mask=resize_fill(mask.crop(box), width, height).convert("L"),
            overlay=_overlay(image, mask),
            crop=box,
            size=image.size,
        )
    doubled = np.clip(np.asarray(mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
    return PreparedArea(
        image=image.resize((width, height), Image.Resampling.LANCZOS),
        mask=mask.resize((width, height), Image.Resampling.LANCZOS),
        overlay=_overlay(image, Image.fromarray(doubled, "L")),
        crop=None,
        size=image.size,
    )


def latent_mask(mask: Image.Image, latent_w: int, latent_h: int) -> np.ndarray:
    """Step 4: the repaint mask at latent size, float32 in {0, 1}: Pillow's default (bicubic) resize, rounded."""
    small = mask.convert("RGB").resize((latent_w, latent_h))
    arr = np.asarray(small, dtype=np.float32)[:, :, 0] / 255.0
    rounded: np.ndarray = np.around(arr)
    return rounded


def conditioning_mask(mask: Image.Image) -> np.ndarray:
    """Step 5's pixel mask: the processing mask as float32 in {0, 1} (rounded), shape [H, W]."""
    rounded: np.ndarray = np.round(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    return rounded


def infotext_fields(spec: MaskSpec) -> tuple[tuple[str, str], ...]:
    """The mask settings as A1111 writes them into the infotext."""
    fields = [("Mask blur", str(spec.blur))]
    if spec.full_res:
        fields += [("Inpaint area", "Only masked"), ("Masked area padding", str(spec.full_res_padding))]
    if spec.invert:
        fields.append(("Mask mode", "Inpaint not masked"))
    fields.append(("Masked content", "original"))
    if spec.initial_noise_multiplier != 1.0:
        fields.append(("Noise multiplier", f"{spec.initial_noise_multiplier:g}"))
    return tuple(fields)


def paste_back(result: Image.Image, area: PreparedArea) -> Image.Image:
    """Step 6: the decoded ``result`` (processing size) back into the input through the overlay."""
    if area.crop is not None:
        x1, y1, x2, y2 = area.crop
        base = Image.new("RGBA", area.size)
        base.paste(resize_cover(result, x2 - x1, y2 - y1), (x1, y1))
    elif result.size != area.size:
        base = result.resize(area.size, Image.Resampling.LANCZOS).convert("RGBA")
    else:
        base = result.convert("RGBA")
    base.alpha_composite(area.overlay)
    return base.convert("RGB")
