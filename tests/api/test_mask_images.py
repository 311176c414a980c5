"""Inpainting masks as A1111 reads them: real alpha is thresholded at > 128, anything else is luminance with its grey
levels kept; the mask goes through the image checks of every other image field."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from underpaint.wire.errors import ApiError
from underpaint.wire.images import decode_mask, mask_channel


def b64(im: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_real_alpha_is_thresholded_above_128() -> None:
    rgba = np.zeros((2, 4, 4), np.uint8)
    rgba[..., 3] = [[0, 128, 129, 255], [255, 255, 255, 255]]
    rgba[..., :3] = 255  # white everywhere: the colour is ignored when the alpha is real
    mask = decode_mask(b64(Image.fromarray(rgba, "RGBA")))
    assert mask.mode == "L"
    assert np.asarray(mask).tolist() == [[0, 0, 255, 255], [255, 255, 255, 255]]


def test_opaque_alpha_and_grey_masks_keep_their_luminance() -> None:
    grey = np.array([[0, 1, 127, 200, 255]], np.uint8)
    opaque = Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)]), "RGBA")
    assert np.asarray(decode_mask(b64(opaque))).tolist() == grey.tolist()
    assert np.asarray(decode_mask(b64(Image.fromarray(grey, "L")))).tolist() == grey.tolist()
    red = Image.new("RGB", (2, 1), (255, 0, 0))
    assert np.asarray(decode_mask(b64(red))).tolist() == [[76, 76]]  # ITU-R 601 luminance, as Pillow's "L"


def test_alpha_in_other_modes_counts_too() -> None:
    la = Image.fromarray(np.dstack([np.full((1, 2), 255, np.uint8), np.array([[0, 200]], np.uint8)]), "LA")
    assert np.asarray(mask_channel(la)).tolist() == [[0, 255]]


def test_a_mask_that_is_not_an_image_is_a_400() -> None:
    with pytest.raises(ApiError) as info:
        decode_mask("bm90IGFuIGltYWdl")
    assert info.value.metadata.get("field") == "mask_image_base64"
