"""Decoding and checking user images (``image_base64`` and ControlNet / IP-Adapter images).

Everything that can go wrong with an untrusted image ends in an ``ApiError`` 400, never a 500:
not base64 / not an image / truncated → ``INVALID_IMAGE_FORMAT``; more than 10 MB of bytes →
``IMAGE_FILE_EXCEEDS_MAX_SIZE``; more than 16 MP, or a decompression bomb (checked from the header, before any
pixel is decoded) → ``IMAGE_EXCEEDS_MAX_RESOLUTION``; animated images → ``INVALID_IMAGE_FORMAT``. An endpoint with
other limits passes them (``ImageLimits``: upscale takes 30 MB files of at most 2048 x 2048).

Unusual but valid images are accepted and converted to 8-bit RGB the way an editor would show them: CMYK
through Pillow's conversion, 16-bit grayscale scaled down (not clipped), palette / alpha images composited on
white, and the EXIF orientation applied. Free of FastAPI so that workers can import it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from underpaint.wire.errors import image_too_large, image_too_many_pixels, invalid_image_format

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 16 * 1024 * 1024
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "MPO")  # MPO: multi-picture JPEGs from cameras

_DATA_URI = re.compile(r"^\s*data:[^,]{0,100};base64,", re.IGNORECASE)
_URLSAFE = str.maketrans("-_", "+/")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    max_side: int | None = None  # each of width and height at most this


DEFAULT_LIMITS = ImageLimits()
INPAINTING_LIMITS = ImageLimits(max_bytes=30 * 1024 * 1024)  # image and mask: 16 MP, 30 MB (Novita's limits)
# ``POST /v3/async/upscale`` (Novita's limits): files up to 30 MB, at most 2048 x 2048, so at most 8192 x 8192 out.
UPSCALE_LIMITS = ImageLimits(max_bytes=30 * 2**20, max_side=2048)


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # 8-bit RGB, fully loaded
    raw_format: str  # Pillow format name of the input: PNG, JPEG, WEBP, BMP, GIF, MPO


def decode_base64(data: str, field: str = "image_base64", max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Standard or urlsafe base64, with or without padding, whitespace or a ``data:...;base64,`` prefix."""
    if not isinstance(data, str) or not data:
        raise invalid_image_format(f"{field}: expected a non-empty base64 string", field=field)
    text = _DATA_URI.sub("", data, count=1)
    # Hopeless sizes are refused before allocating a decoded copy (slack for line breaks every 76 chars).
    if len(text) > (max_bytes + 2) // 3 * 4 * 1.05:
        raise _too_large(field, None, max_bytes)
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)  # fast path: canonical base64 (what the SDKs send)
    except ValueError:  # binascii.Error, or a non-ASCII character
        raw = _decode_lenient(text, field, max_bytes)
    if not raw:
        raise invalid_image_format(f"{field}: decodes to an empty file", field=field)
    if len(raw) > max_bytes:
        raise _too_large(field, len(raw), max_bytes)
    return raw


def _decode_lenient(text: str, field: str, max_bytes: int) -> bytes:
    text = "".join(text.split())  # str.split() is much faster than a regex over megabytes
    if len(text) // 4 * 3 > max_bytes + 3:
        raise _too_large(field, None, max_bytes)
    if "-" in text or "_" in text:
        text = text.translate(_URLSAFE)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid_image_format(f"{field}: not valid base64 ({exc})", field=field) from None


def _too_large(field: str, size: int | None, max_bytes: int) -> Exception:
    got = f"{size} bytes" if size is not None else "larger than that"
    limit = f"{max_bytes / 2**20:g} MB"
    return image_too_large(f"{field}: image is {got}; the maximum file size is {limit}", field=field)


def open_image(raw: bytes, field: str = "image_base64", limits: ImageLimits = DEFAULT_LIMITS) -> DecodedImage:
    """Bytes → checked, fully decoded RGB image."""
    im, fmt = _open_checked(raw, field, limits)
    try:
        rgb = to_rgb(im)
    except Exception:  # exotic modes Pillow cannot convert (LAB, HSV ...)
        raise invalid_image_format(
            f"{field}: unsupported color mode {im.mode}; send an RGB, grayscale or CMYK image", field=field
        ) from None
    return DecodedImage(rgb, fmt)


def decode_mask(data: str, field: str = "mask_image_base64", limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """An inpainting mask (white = repaint) → one 8-bit channel, with the image checks of ``decode_image``."""
    im, _ = _open_checked(decode_base64(data, field, limits.max_bytes), field, limits)
    try:
        return mask_channel(im)
    except Exception:  # exotic modes Pillow cannot convert
        raise invalid_image_format(
            f"{field}: unsupported color mode {im.mode}; send a grayscale, RGB or RGBA mask", field=field
        ) from None


def mask_channel(im: Image.Image) -> Image.Image:
    """A1111's reading of a mask (v1.8 ``create_binary_mask``, with rounding): an image with real transparency
    (an alpha channel that is not fully opaque) is its alpha, thresholded at > 128; anything else is its
    luminance with the grey levels kept. Unlike A1111, which looks at RGBA images only, every mode with alpha
    (LA, PA, palette transparency) is read the same way."""
    im = _upright(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        alpha = im.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda v: 255 if v > 128 else 0)
    return to_rgb(im).convert("L")


def _open_checked(raw: bytes, field: str, limits: ImageLimits) -> tuple[Image.Image, str]:
    """Bytes → a fully loaded Pillow image in its own mode, after every check of ``open_image``."""
    try:
        im = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise _too_many_pixels(field, None, limits) from None
    except Exception:  # any parser failure on untrusted bytes is the client's bad image
        raise invalid_image_format(
            f"{field}: not a readable image (supported: PNG, JPEG, WebP, BMP, GIF)", field=field
        ) from None
    # Not closed on purpose: the data lives in memory (BytesIO), and the RGB result may be this very object.
    fmt = (im.format or "").upper()
    if fmt not in ALLOWED_FORMATS:
        raise invalid_image_format(
            f"{field}: unsupported image format {fmt or 'unknown'} (supported: PNG, JPEG, WebP, BMP, GIF)",
            field=field,
        )
    width, height = im.size  # from the header: nothing decoded yet
    if width <= 0 or height <= 0:
        raise invalid_image_format(f"{field}: image has no pixels", field=field)
    too_wide = limits.max_side is not None and max(width, height) > limits.max_side
    if width * height > limits.max_pixels or too_wide:
        raise _too_many_pixels(field, (width, height), limits)
    try:
        animated = fmt != "MPO" and getattr(im, "n_frames", 1) > 1  # GIF counts frames by scanning the file
        if not animated:
            im.load()
    except Image.DecompressionBombError:
        raise _too_many_pixels(field, (width, height), limits) from None
    except Exception:  # truncated/corrupt data surfaces as assorted errors inside Pillow
        raise invalid_image_format(f"{field}: image data is truncated or corrupt", field=field) from None
    if animated:
        raise invalid_image_format(f"{field}: animated images are not supported; send a single frame", field=field)
    return im, fmt


def decode_image(data: str, field: str = "image_base64", limits: ImageLimits = DEFAULT_LIMITS) -> DecodedImage:
    return open_image(decode_base64(data, field, limits.max_bytes), field, limits)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer would display it (EXIF orientation applied, transparency on white)."""
    im = _upright(im)
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16 → L conversion clips at 255; scale the 16-bit range down instead.
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block is ignored rather than failing the image."""
    try:
        if im.getexif().get(0x0112, 1) in (1, None):
            return im
        return ImageOps.exif_transpose(im)
    except Exception:  # EXIF is optional metadata from untrusted files
        return im


def _too_many_pixels(field: str, size: tuple[int, int] | None, limits: ImageLimits) -> Exception:
    dims = f" ({size[0]}x{size[1]})" if size else ""
    if limits.max_side is not None:
        limit = f"{limits.max_side}x{limits.max_side}"
    else:
        limit = f"{limits.max_pixels / 2**20:g} megapixels"
    return image_too_many_pixels(f"{field}: image resolution{dims} exceeds the maximum of {limit}", field=field)
