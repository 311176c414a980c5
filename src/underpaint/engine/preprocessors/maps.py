"""Weight-free control maps: ``canny``, ``shuffle``, ``lineart_standard`` and the Python SDK's ``invert``,
``threshold``, ``binary``, ``color``, ``scribble_xdog``, ``tile_resample``.

``shuffle`` and ``lineart_standard`` follow A1111's ControlNet extension (as controlnet_aux's
``ContentShuffleDetector`` and ``LineartStandardDetector`` do; tests compare with those): the image is first
resized to the detection resolution the A1111 way (``detect_size``). Our detection resolution is the output's
short side, as for the network annotators other than the depth family.
"""

from __future__ import annotations

import cv2
import numpy as np

from underpaint.engine.preprocessors.context import Context

Array = np.ndarray

SHUFFLE_NOISE_SCALE = 256  # A1111's content shuffle: the noise disk's feature size f
LINEART_STANDARD_SIGMA = 6.0  # A1111's lineart_standard: Gaussian sigma and intensity threshold
LINEART_STANDARD_THRESHOLD = 8


def gray3(x: Array) -> Array:
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x


def detect_size(h: int, w: int, resolution: int) -> tuple[int, int]:
    """A1111's detection size (h, w): short side scaled to ``resolution``, both sides rounded to multiples of 64
    (half to even, as numpy rounds)."""
    k = resolution / min(h, w)
    return int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64


def resize_for_detection(img: Array, resolution: int) -> Array:
    """``img`` at ``detect_size``: Lanczos when enlarging, area averaging when shrinking (as A1111)."""
    h, w = img.shape[:2]
    nh, nw = detect_size(h, w, resolution)
    enlarge = resolution > min(h, w)
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LANCZOS4 if enlarge else cv2.INTER_AREA)


def canny(img: Array, ctx: Context) -> Array:
    # A1111's defaults: low 100, high 200.
    return gray3(cv2.Canny(img, 100, 200))


def noise_disk(rng: np.random.RandomState, h: int, w: int, f: int) -> Array:
    """A smooth random field in [0, 1], (h, w, 1): uniform noise on a grid of cell size ``f`` (one cell of margin
    on each side), upsampled bicubically, cropped to the image, min-max normalised."""
    coarse = rng.uniform(0.0, 1.0, size=(h // f + 2, w // f + 2, 1))
    smooth = cv2.resize(coarse, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f : f + h, f : f + w]
    smooth = smooth - smooth.min()
    smooth = smooth / smooth.max()
    return np.asarray(smooth)[:, :, None]


def shuffle(img: Array, ctx: Context) -> Array:
    """Content shuffle: every pixel is fetched from a position given by two smooth random fields (x, then y), the
    task seed seeding numpy's legacy generator (A1111 draws from numpy's global one)."""
    src = resize_for_detection(gray3(img), min(img.shape[:2]))
    h, w = src.shape[:2]
    rng = np.random.RandomState(ctx.seed % 2**32)
    xs = (noise_disk(rng, h, w, SHUFFLE_NOISE_SCALE) * float(w - 1))[:, :, 0].astype(np.float32)
    ys = (noise_disk(rng, h, w, SHUFFLE_NOISE_SCALE) * float(h - 1))[:, :, 0].astype(np.float32)
    return np.asarray(cv2.remap(src, xs, ys, cv2.INTER_LINEAR))


def lineart_standard(img: Array, ctx: Context) -> Array:
    """Dark lines as white: how far each pixel is below its Gaussian-blurred surroundings (darkest channel),
    scaled so that the median of the clear lines maps to 127."""
    h, w = img.shape[:2]
    x = resize_for_detection(gray3(img), min(h, w)).astype(np.float32)
    blurred = cv2.GaussianBlur(x, (0, 0), LINEART_STANDARD_SIGMA)
    intensity = np.min(blurred - x, axis=2).clip(0, 255)
    lines = intensity[intensity > LINEART_STANDARD_THRESHOLD]
    intensity /= max(16.0, float(np.median(lines))) if lines.size else 16.0
    out = gray3((intensity * 127).clip(0, 255).astype(np.uint8))
    return cv2.resize(out, (w, h), interpolation=cv2.INTER_CUBIC)


def invert(img: Array, ctx: Context) -> Array:
    return 255 - img


def threshold(img: Array, ctx: Context) -> Array:
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return gray3(np.where(gray > 127, 255, 0).astype(np.uint8))


def binary(img: Array, ctx: Context) -> Array:
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    _, out = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return gray3(out)


def color(img: Array, ctx: Context) -> Array:
    # A1111 "color": a 64x downscale mosaic of the colours.
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(w // 64, 1), max(h // 64, 1)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def scribble_xdog(img: Array, ctx: Context) -> Array:
    # Difference of Gaussians: white lines on black where 2 * (255 - dog) exceeds A1111's threshold 32.
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    return gray3(np.where(2 * (255 - dog.astype(np.int32)) > 32, 255, 0).astype(np.uint8))


def tile_resample(img: Array, ctx: Context) -> Array:
    return img
