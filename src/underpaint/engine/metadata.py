"""A1111-style "parameters" infotext and output encoding (PNG text chunk, EXIF UserComment for JPEG/WebP).

A result dropped into A1111's PNG Info tab or onto civitai shows how it was made.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, PngImagePlugin

from underpaint import __version__
from underpaint.engine.job import HiresFix

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"


@dataclass(frozen=True)
class InfotextParams:
    prompt: str
    negative_prompt: str
    steps: int
    sampler_name: str
    guidance_scale: float
    seed: int
    width: int
    height: int
    model_name: str
    model_hash: str
    strength: float | None  # img2img's denoising strength; None for txt2img (the hires fix carries its own)
    clip_skip: int
    loras: tuple[tuple[str, float], ...] = ()
    vae_name: str | None = None
    vae_hash: str | None = None
    schedule_type: str | None = None  # A1111 >= 1.9's "Schedule type", written when the request sent one
    # further "Key: value" pairs in A1111's order, written before "Version" (inpainting's mask settings ...)
    extra: tuple[tuple[str, str], ...] = ()
    hires_fix: HiresFix | None = None
    refiner: tuple[str, float] | None = None  # (A1111's short title "name [hash]", switch_at)


def _quote(value: str) -> str:
    # A1111 quotes values containing its separators so the line parses back.
    if "," in value or ":" in value or '"' in value or "\n" in value:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def build_infotext(p: InfotextParams) -> str:
    # A1111 carries LoRAs in the prompt as <lora:name:weight>; writing them there restores them on paste.
    prompt = p.prompt + "".join(f" <lora:{name}:{_num(w)}>" for name, w in p.loras)
    fields: list[tuple[str, str]] = [
        ("Steps", str(p.steps)),
        ("Sampler", p.sampler_name),
        *([("Schedule type", p.schedule_type)] if p.schedule_type else []),
        ("CFG scale", _num(p.guidance_scale)),
        ("Seed", str(p.seed)),
        ("Size", f"{p.width}x{p.height}"),
        ("Model hash", p.model_hash),
        ("Model", p.model_name),
    ]
    if p.vae_name:
        fields += [("VAE hash", p.vae_hash or ""), ("VAE", p.vae_name)]
    # A1111 writes "Denoising strength" for img2img, and for txt2img only with the hires fix (its strength).
    strength = p.hires_fix.strength if p.hires_fix is not None else p.strength
    if strength is not None:
        fields.append(("Denoising strength", _num(strength)))
    if p.clip_skip > 1:
        fields.append(("Clip skip", str(p.clip_skip)))
    if p.hires_fix is not None:
        # Novita sends a target size, which is A1111's "Hires resize" (a scale factor would be "Hires upscale").
        fields += [
            ("Hires resize", f"{p.hires_fix.width}x{p.hires_fix.height}"),
            ("Hires upscaler", p.hires_fix.upscaler),
        ]
    if p.refiner is not None:
        fields += [("Refiner", p.refiner[0]), ("Refiner switch at", _num(p.refiner[1]))]
    fields.extend(p.extra)
    fields.append(("Version", f"underpaint-{__version__}"))
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields if v != "")
    lines = [prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    lines.append(line)
    return "\n".join(lines)


CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: Image.Image, image_type: str, infotext: str) -> bytes:
    buf = io.BytesIO()
    if image_type == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", infotext)
        image.save(buf, format="PNG", pnginfo=info)
    elif image_type in ("jpeg", "webp"):
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_PREFIX + infotext.encode("utf-16-be")
        fmt = "JPEG" if image_type == "jpeg" else "WEBP"
        image.convert("RGB").save(buf, format=fmt, quality=90, exif=exif.tobytes())
    else:
        raise ValueError(f"unsupported image type {image_type!r}")
    return buf.getvalue()


def read_infotext(data: bytes) -> str | None:
    """The infotext back from an encoded image (used by tests and the CLI)."""
    img = Image.open(io.BytesIO(data))
    text = img.info.get("parameters")
    if isinstance(text, str):
        return text
    raw = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(_UNICODE_PREFIX):
        return raw[len(_UNICODE_PREFIX) :].decode("utf-16-be")
    return None
