"""Fuzz target for the untrusted-image decoder (hypothesis, a bounded run in CI).

Property, whatever the input (arbitrary text or bytes as base64, valid files of every accepted format with bytes
flipped, cut or inserted, headers claiming any dimensions, decompression bombs): ``decode_image`` returns a fully
decoded RGB image within the limits, or raises the Novita image error (an ``ApiError`` 400 with one of the image
reasons). Any other exception, a 5xx or a hang is a failure, and hypothesis shrinks it to a minimal input.

``UNDERPAINT_FUZZ_EXAMPLES`` scales the run (default 150 examples per test, about 20 s in all here); a longer
local run: ``UNDERPAINT_FUZZ_EXAMPLES=5000 pytest tests/api/test_image_fuzz.py``.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from underpaint.wire.errors import ApiError
from underpaint.wire.images import MAX_IMAGE_PIXELS, DecodedImage, decode_image

IMAGE_REASONS = {"INVALID_IMAGE_FORMAT", "IMAGE_FILE_EXCEEDS_MAX_SIZE", "IMAGE_EXCEEDS_MAX_RESOLUTION"}
# Each accepted format with the modes Pillow writes for it (CMYK JPEG, 16-bit PNG, palettes, 1-bit ...).
MODES = {
    "PNG": ("RGB", "RGBA", "L", "LA", "P", "I;16", "1"),
    "JPEG": ("RGB", "L", "CMYK"),
    "WEBP": ("RGB", "RGBA"),
    "GIF": ("P", "L", "1"),
    "BMP": ("RGB", "L", "P", "1"),
}

# Pillow warns (and we refuse) between its own limit and twice it; the property below checks what we answer.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

fuzz = settings(
    max_examples=int(os.environ.get("UNDERPAINT_FUZZ_EXAMPLES", "150")),
    deadline=None,  # a shared CI machine; hangs are caught by pytest-timeout instead
    database=None,  # no .hypothesis folder in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check(data: str) -> DecodedImage | ApiError:
    """The property: an RGB image within limits, or a Novita image error; anything else propagates."""
    outcome: DecodedImage | ApiError
    try:
        outcome = decode_image(data, "request.image_base64")
    except ApiError as err:
        outcome = err
    if isinstance(outcome, ApiError):
        assert outcome.status == 400, outcome.body()
        assert outcome.reason in IMAGE_REASONS, outcome.body()
        assert outcome.metadata.get("field") == "request.image_base64"
        return outcome
    decoded = outcome
    assert decoded.image.mode == "RGB"
    width, height = decoded.image.size
    assert 0 < width * height <= MAX_IMAGE_PIXELS
    decoded.image.tobytes()  # really decoded, not a lazy handle onto bad data
    return decoded


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(fmt: str, mode: str, size: tuple[int, int], seed: int) -> bytes:
    """A small valid file; the pixels are a deterministic pattern so that flips hit real compressed data."""
    w, h = size
    pattern = bytes((seed + x * 7 + y * 13 + (x * y) % 31) % 256 for y in range(h) for x in range(w))
    im = Image.frombytes("L", size, pattern)
    if mode in ("I;16", "1"):
        im = im.convert(mode)
    elif mode != "L":
        im = Image.merge("RGB", (im, im.transpose(Image.Transpose.ROTATE_180), im)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@st.composite
def valid_files(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(sorted(MODES)))
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    return encode(fmt, draw(st.sampled_from(MODES[fmt])), size, draw(st.integers(0, 255)))


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_files()))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(("flip", "cut", "insert", "delete")))
        pos = draw(st.integers(0, len(data) - 1)) if data else 0
        if action == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif action == "cut":
            data = data[:pos]
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


dimension = st.one_of(st.integers(0, 70_000), st.integers(0, 2**32 - 1))


@st.composite
def files_claiming_any_size(draw: st.DrawFn) -> bytes:
    """Valid headers (checksums right) that claim arbitrary dimensions over little or no pixel data:
    decompression bombs, zero sizes, sizes past every limit."""
    width, height = draw(dimension), draw(dimension)
    kind = draw(st.sampled_from(("PNG", "GIF", "BMP", "JPEG")))
    rows = draw(st.binary(max_size=64))
    if kind == "PNG":
        depth, color = draw(st.sampled_from([(8, 0), (8, 2), (8, 6), (16, 0), (1, 0), (8, 3)]))
        ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, draw(st.integers(0, 1)))
        palette = png_chunk(b"PLTE", b"\0\0\0" * 2) if color == 3 else b""
        return (
            b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", ihdr)
            + palette
            + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b"")
        )
    if kind == "GIF":
        w, h = width & 0xFFFF, height & 0xFFFF
        screen = struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
        frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02" + bytes([len(rows[:255])]) + rows[:255]
        return b"GIF89a" + screen + frame + b"\x00\x3b"
    if kind == "BMP":
        w, h = width & 0x7FFFFFFF, (height & 0xFFFFFFFF) - (2**32 if height >= 2**31 else 0)
        info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(rows), 2835, 2835, 0, 0)
        return b"BM" + struct.pack("<IHHI", 14 + 40 + len(rows), 0, 0, 54) + info + rows
    # JPEG: a real small file with its SOF0 dimensions rewritten
    data = bytearray(encode("JPEG", "RGB", (8, 8), 1))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    return bytes(data)


@fuzz
@given(st.text(max_size=300))
def test_any_text(text: str) -> None:
    check(text)


@fuzz
@given(st.binary(max_size=2048))
def test_any_bytes_as_base64(data: bytes) -> None:
    check(b64(data))
    check("data:image/png;base64," + base64.urlsafe_b64encode(data).decode().rstrip("="))


@fuzz
@given(valid_files())
def test_valid_files_decode(data: bytes) -> None:
    assert isinstance(check(b64(data)), DecodedImage)


@fuzz
@given(mutated_files())
def test_corrupt_and_truncated_files(data: bytes) -> None:
    check(b64(data))


@fuzz
@given(files_claiming_any_size())
def test_headers_claiming_any_dimensions(data: bytes) -> None:
    outcome = check(b64(data))
    if isinstance(outcome, DecodedImage):
        assert outcome.image.width * outcome.image.height <= MAX_IMAGE_PIXELS


def test_the_fuzz_target_sees_every_outcome() -> None:
    """The strategies reach all three image errors and successes (a fuzz target that only ever sees one outcome
    tests little); fixed examples of each, through the same property."""
    bomb = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60_000, 60_000, 8, 0, 0, 0, 0))
    outcomes = [
        check(b64(encode("PNG", "RGB", (8, 8), 0))),
        check("not base64 at all!"),
        check("iVBORw0KGgo\u00e9"),  # a non-ASCII character used to escape as a ValueError (a 500)
        check(b64(b"\x89PNG\r\n\x1a\n" + bomb + png_chunk(b"IEND", b""))),
        check("A" * (15 * 1024 * 1024)),
    ]
    assert isinstance(outcomes[0], DecodedImage)
    assert [o.reason for o in outcomes[1:] if isinstance(o, ApiError)] == [
        "INVALID_IMAGE_FORMAT",
        "INVALID_IMAGE_FORMAT",
        "IMAGE_EXCEEDS_MAX_RESOLUTION",
        "IMAGE_FILE_EXCEEDS_MAX_SIZE",
    ]
