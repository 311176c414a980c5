"""Untrusted images: broken ones get 400s with the right reason, unusual valid ones are converted to RGB."""

from __future__ import annotations

import base64
import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from tests.support.api import Submit, b64, image_bytes

from underpaint.wire.errors import ApiError
from underpaint.wire.images import decode_base64, decode_image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming widthxheight, with one row of data (a decompression bomb's shape)."""
    return raw_png(width, height, 8, 0, b"\0" * (width + 1))


def error_of(data: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_image(data, "request.image_base64")
    return info.value


def noise_png(size: int = 256) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


BROKEN = {
    "not base64": ("!!!not base64###", "INVALID_IMAGE_FORMAT"),
    "base64 of text": (b64(b"hello, this is not an image"), "INVALID_IMAGE_FORMAT"),
    "empty": ("", "INVALID_REQUEST_BODY"),
    "blank": ("  \n", "INVALID_REQUEST_BODY"),
    "truncated png": (b64(noise_png()[:20000]), "INVALID_IMAGE_FORMAT"),
    "truncated jpeg": (b64(image_bytes((256, 256), fmt="JPEG", quality=95)[:600]), "INVALID_IMAGE_FORMAT"),
    "bomb 20000x20000": (b64(bomb_png(20000, 20000)), "IMAGE_EXCEEDS_MAX_RESOLUTION"),
    "header 5000x4000": (b64(bomb_png(5000, 4000)), "IMAGE_EXCEEDS_MAX_RESOLUTION"),
    "over 10 MB": (b64(os.urandom(10 * 1024 * 1024 + 1)), "IMAGE_FILE_EXCEEDS_MAX_SIZE"),
    "animated gif": (b64(animated("GIF")), "INVALID_IMAGE_FORMAT"),
    "animated webp": (b64(animated("WEBP")), "INVALID_IMAGE_FORMAT"),
    "animated png": (b64(animated("PNG")), "INVALID_IMAGE_FORMAT"),
    "tiff": (b64(image_bytes(fmt="TIFF")), "INVALID_IMAGE_FORMAT"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_images_rejected_by_api(submit: Submit, case: str) -> None:
    data, reason = BROKEN[case]
    r = submit(image=data)
    assert r.status_code == 400, r.text
    assert r.json()["reason"] == reason
    assert r.json()["metadata"]["field"] == "request.image_base64"


def test_bomb_rejected_from_header_without_decoding() -> None:
    data = b64(bomb_png(20000, 20000))
    start = time.perf_counter()
    err = error_of(data)
    assert err.reason == "IMAGE_EXCEEDS_MAX_RESOLUTION"
    assert time.perf_counter() - start < 0.5  # decoding 400 MP would take seconds and gigabytes


def test_real_image_over_16_megapixels() -> None:
    buf = io.BytesIO()
    Image.new("L", (4100, 4100)).save(buf, "PNG")  # 16.81 MP > 16 MiP
    err = error_of(b64(buf.getvalue()))
    assert err.reason == "IMAGE_EXCEEDS_MAX_RESOLUTION"
    assert "4100x4100" in err.message


def test_animated_message_is_clear() -> None:
    assert "animated" in error_of(b64(animated("GIF"))).message


def test_broken_controlnet_and_ipadapter_images(submit: Submit, png_b64: str) -> None:
    unit = {"model_name": "control_v11p_sd15_canny", "image_base64": b64(noise_png()[:5000])}
    r = submit(controlnet={"units": [unit]})
    assert r.status_code == 400
    assert r.json()["metadata"]["field"] == "request.controlnet.units[0].image_base64"
    adapter = {"model_name": "ip-adapter_sd15.bin", "image_base64": b64(animated("GIF")), "strength": 0.5}
    r = submit(ip_adapters=[adapter])
    assert r.status_code == 400
    assert r.json()["metadata"]["field"] == "request.ip_adapters[0].image_base64"
    r = submit(ip_adapters=[adapter | {"image_base64": b64(bomb_png(20000, 20000))}])
    assert r.json()["reason"] == "IMAGE_EXCEEDS_MAX_RESOLUTION"


# --- accepted and converted -----------------------------------------------------------------------------------


def pixel(data: bytes) -> tuple[int, ...]:
    decoded = decode_image(b64(data))
    assert decoded.image.mode == "RGB"
    return decoded.image.getpixel((3, 3))  # type: ignore[return-value]


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 3) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_cmyk_jpeg_converted(submit: Submit) -> None:
    data = image_bytes(mode="CMYK", fmt="JPEG", color=(0, 255, 255, 0), quality=100)  # pure red in CMYK
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert close(pixel(data), (255, 0, 0), tol=6)
    assert submit(image=b64(data)).status_code == 200


def test_16bit_gray_png_scaled_not_clipped(submit: Submit) -> None:
    rows = b"".join(b"\0" + struct.pack(">H", 0x8080) * 8 for _ in range(8))
    data = raw_png(8, 8, 16, 0, rows)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert pixel(data) == (128, 128, 128)
    assert submit(image=b64(data)).status_code == 200


def test_16bit_rgb_png(submit: Submit) -> None:
    rows = b"".join(b"\0" + struct.pack(">HHH", 0xFFFF, 0x8080, 0x0000) * 8 for _ in range(8))
    data = raw_png(8, 8, 16, 2, rows)
    assert close(pixel(data), (255, 128, 0), tol=1)
    assert submit(image=b64(data)).status_code == 200


def test_rgba_composited_on_white(submit: Submit) -> None:
    transparent = image_bytes(mode="RGBA", color=(200, 30, 60, 0))
    half = image_bytes(mode="RGBA", color=(255, 0, 0, 128))
    assert pixel(transparent) == (255, 255, 255)
    assert close(pixel(half), (255, 127, 127), tol=2)
    assert submit(image=b64(half)).status_code == 200


def test_la_palette_and_grayscale() -> None:
    assert close(pixel(image_bytes(mode="LA", color=(0, 0))), (255, 255, 255), tol=0)
    assert pixel(image_bytes(mode="L", color=77)) == (77, 77, 77)
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    assert pixel(buf.getvalue()) == (10, 200, 30)
    pal2 = Image.new("P", (16, 16), 0)
    pal2.putpalette([0, 0, 0] * 256)
    buf = io.BytesIO()
    pal2.save(buf, "PNG", transparency=0)
    assert pixel(buf.getvalue()) == (255, 255, 255)


def test_exif_orientation_applied() -> None:
    im = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    assert decode_image(b64(buf.getvalue())).image.size == (20, 40)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_supported_formats(fmt: str) -> None:
    decoded = decode_image(b64(image_bytes((32, 24), fmt=fmt)))
    assert decoded.raw_format == fmt
    assert decoded.image.size == (32, 24)
    assert decoded.image.mode == "RGB"


# --- base64 tolerance ------------------------------------------------------------------------------------------

PNG = image_bytes((16, 16))


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(PNG).decode(),
        base64.b64encode(PNG).decode().rstrip("="),
        base64.encodebytes(PNG).decode(),  # newlines every 76 chars
        "  " + base64.b64encode(PNG).decode() + "\r\n",
        "data:image/png;base64," + base64.b64encode(PNG).decode(),
        base64.urlsafe_b64encode(PNG).decode(),
        base64.urlsafe_b64encode(PNG).decode().rstrip("="),
    ],
)
def test_base64_variants(text: str) -> None:
    assert decode_base64(text) == PNG


def test_png_with_missing_padding_through_api(submit: Submit) -> None:
    text = base64.b64encode(image_bytes((17, 17))).decode()
    assert text.endswith("=")
    assert submit(image=text.rstrip("=")).status_code == 200


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_mutated_files_only_ever_give_api_errors(fmt: str) -> None:
    """Random byte flips and cuts of valid files: every outcome is an image or a 400, never another exception."""
    rng = np.random.default_rng(1234)
    original = bytearray(image_bytes((24, 16), fmt=fmt) if fmt != "GIF" else animated("GIF"))
    outcomes = {"ok": 0, "error": 0}
    error_statuses: set[int] = set()
    for _ in range(120):
        data = bytearray(original)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 6))):
            data[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(1, len(data)))]
        try:
            decoded = decode_image(b64(bytes(data)))
        except ApiError as err:
            error_statuses.add(err.status)
            outcomes["error"] += 1
        else:
            assert decoded.image.mode == "RGB"
            outcomes["ok"] += 1
    assert outcomes["error"] > 0
    assert error_statuses == {400}


def test_an_endpoint_can_pass_its_own_limits() -> None:
    """Upscale: files up to 30 MB, each side at most 2048 (checked from the header, before decoding)."""
    from underpaint.wire.images import ImageLimits

    limits = ImageLimits(max_bytes=30 * 2**20, max_side=2048)
    assert decode_image(b64(raw_png(2048, 1, 8, 0, b"\0" * 2049)), limits=limits).image.size == (2048, 1)
    for width, height in ((2049, 16), (3464, 2309)):  # one side over; 8 MP
        with pytest.raises(ApiError) as info:
            decode_image(b64(bomb_png(width, height)), "request.image_base64", limits)
        assert info.value.reason == "IMAGE_EXCEEDS_MAX_RESOLUTION"
        assert f"({width}x{height}) exceeds the maximum of 2048x2048" in info.value.message
    big = b"\0" * (12 * 2**20)  # over the default 10 MB, under 30 MB: the size check passes, the format does not
    with pytest.raises(ApiError) as info:
        decode_image(b64(big), "request.image_base64", limits)
    assert info.value.reason == "INVALID_IMAGE_FORMAT"
    with pytest.raises(ApiError) as info:
        decode_image(b64(big), "request.image_base64")
    assert info.value.reason == "IMAGE_FILE_EXCEEDS_MAX_SIZE"
    assert "maximum file size is 10 MB" in info.value.message
    with pytest.raises(ApiError) as info:
        decode_image(b64(b"\0" * (31 * 2**20)), "request.image_base64", limits)
    assert "maximum file size is 30 MB" in info.value.message
