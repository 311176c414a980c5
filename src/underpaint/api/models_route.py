"""``GET /v3/model``: the models folder in Novita's Query Model shape, with every filter form the SDKs send.

Decisions (the official service has per-user models; a self-hosted server has only the operator's folder):

* Visibility: every local model is shared by all API keys, so it is reported as ``visibility: "public"``.
  ``filter.visibility=public`` or no visibility filter lists them; ``private`` (per-user uploads/trainings,
  which this server does not have) is always empty. The Python SDK's ``models_v3()`` walks public then private,
  so it sees each model exactly once.
* Source: every model is ``source: "uploading"`` (files the operator put in place); ``filter.source`` is
  honoured, so ``civitai``/``training`` give an empty list.
* Inpainting: a checkpoint whose UNet takes 9 input channels (told from the file: ``registry.unet_in_channels``)
  is an inpainting model (``base_model_type: "Inpainting"``), whatever its name. ``filter.is_inpainting=true`` lists only those; ``false`` (which the
  Python SDK always sends) does not filter, so that SDK still lists every model.
* Types: ``checkpoint, lora, vae, textualinversion (JS: text_inversion), controlnet, ipadapter, upscaler``;
  several may be given comma-separated. Upscalers (``models/upscaler/``) are named by their file's stem, like LoRAs
  (``RealESRGAN_x4plus_anime_6B``), and have no base model (``base_model: ""``).
* Pagination: ``pagination.limit`` 1..100 (default 100; anything else is a 400), ``pagination.cursor`` empty
  or ``c_<offset>`` — the Python SDK builds ``c_0``, ``c_100`` … itself, and ``next_cursor`` uses the same
  form (``""`` on the last page).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.datastructures import QueryParams

from underpaint.registry import ModelEntry, ModelRegistry
from underpaint.wire.errors import invalid_request

LISTED_KINDS = ("checkpoint", "lora", "vae", "textualinversion", "controlnet", "ipadapter", "upscaler")
TYPE_ALIASES: dict[str, str | None] = {
    "checkpoint": "checkpoint",
    "lora": "lora",
    "locon": "lora",
    "vae": "vae",
    "textualinversion": "textualinversion",
    "text_inversion": "textualinversion",
    "embedding": "textualinversion",
    "controlnet": "controlnet",
    "ipadapter": "ipadapter",
    "ip_adapter": "ipadapter",
    "upscaler": "upscaler",
}
DISPLAY_NAMES = {
    "checkpoint": "Checkpoint",
    "lora": "LoRA",
    "vae": "VAE",
    "textualinversion": "Textual Inversion",
    "controlnet": "ControlNet",
    "ipadapter": "IP-Adapter",
    "upscaler": "Upscaler",
}
VISIBILITY = "public"
SOURCE = "uploading"
MAX_LIMIT = 100
_BRACKETS = re.compile(r"\[([^\]]*)\]")
# The Python SDK prefixes "c_" to whatever cursor it is given, so "c_c_100" is our own "c_100" passed back.
_CURSOR = re.compile(r"^(?:c_)+(\d{1,9})$")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def normalize_params(params: QueryParams) -> dict[str, str]:
    """``filter[types]`` → ``filter.types``; ``filter.type`` → ``filter.types``; the last value wins."""
    out: dict[str, str] = {}
    for key, value in params.multi_items():
        name = _BRACKETS.sub(r".\1", key).strip().lower()
        if name == "filter.type":
            name = "filter.types"
        out[name] = value
    return out


def list_models(registry: ModelRegistry, params: QueryParams) -> dict[str, Any]:
    q = normalize_params(params)
    kinds = _kinds(q.get("filter.types", ""))
    visibility = q.get("filter.visibility", "").strip().lower()
    if visibility not in ("", "public", "private"):
        raise invalid_request("filter.visibility: must be public or private", field="filter.visibility")
    source = q.get("filter.source", "").strip().lower()
    is_sdxl = _bool(q, "filter.is_sdxl")
    is_inpainting = _bool(q, "filter.is_inpainting")
    text = q.get("filter.query", "").strip().lower()
    limit = _limit(q.get("pagination.limit", ""))
    offset = _offset(q.get("pagination.cursor", ""))

    entries: list[ModelEntry] = []
    if visibility in ("", VISIBILITY) and source in ("", SOURCE):
        for kind in kinds:
            entries.extend(registry.list(kind))
    if is_sdxl is not None:
        entries = [e for e in entries if e.is_sdxl == is_sdxl]
    if is_inpainting:
        entries = [e for e in entries if registry.is_inpainting(e)]
    if text:
        entries = [e for e in entries if text in e.sd_name.lower() or text in e.stem.lower()]

    page = entries[offset : offset + limit]
    more = offset + limit < len(entries)
    return {
        "models": [model_info(e, registry.hashes.sha256(e.path), registry.is_inpainting(e)) for e in page],
        "pagination": {"next_cursor": f"c_{offset + limit}" if more else ""},
    }


def model_info(entry: ModelEntry, sha256: str, is_inpainting: bool = False) -> dict[str, Any]:
    return {
        "id": entry.id,
        "name": entry.stem,
        "sd_name": entry.sd_name,
        "sd_name_in_api": entry.sd_name_in_api,
        "type": {"name": entry.kind, "display_name": DISPLAY_NAMES.get(entry.kind, entry.kind)},
        "status": 1,
        "hash_sha256": sha256,
        "categories": [],
        "tags": [],
        "cover_url": "",
        "source": SOURCE,
        "base_model": "" if entry.kind == "upscaler" else entry.base_model,
        "base_model_type": "Inpainting" if is_inpainting else "Standard",
        "download_url": "",
        "download_url_ttl": 0,
        "is_sdxl": entry.is_sdxl,
        "is_nsfw": False,
        "visibility": VISIBILITY,
    }


def _kinds(raw: str) -> list[str]:
    names = [t.strip().lower() for t in raw.split(",") if t.strip()]
    if not names:
        return list(LISTED_KINDS)
    kinds: list[str] = []
    for name in names:
        if name not in TYPE_ALIASES:
            raise invalid_request(
                f"filter.types: unknown model type {name!r}; expected one of: {', '.join(TYPE_ALIASES)}",
                field="filter.types",
            )
        kind = TYPE_ALIASES[name]
        if kind is not None and kind not in kinds:
            kinds.append(kind)
    return kinds


def _bool(q: dict[str, str], name: str) -> bool | None:
    raw = q.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise invalid_request(f"{name}: must be true or false (got {q[name]!r})", field=name)


def _limit(raw: str) -> int:
    raw = raw.strip()
    if not raw:
        return MAX_LIMIT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value.is_integer() or not 1 <= value <= MAX_LIMIT:
        raise invalid_request(
            f"pagination.limit: must be an integer between 1 and {MAX_LIMIT} (got {raw!r})", field="pagination.limit"
        )
    return int(value)


def _offset(raw: str) -> int:
    raw = raw.strip()
    if not raw:
        return 0
    match = _CURSOR.match(raw)
    if match is None:
        raise invalid_request(
            f"pagination.cursor: invalid cursor {raw!r}; pass the previous next_cursor, or c_<offset>",
            field="pagination.cursor",
        )
    return int(match.group(1))
