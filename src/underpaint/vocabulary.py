"""Names the API and the engine share, in a module that imports nothing heavy (API nodes never import torch)."""

from __future__ import annotations

# The 20 A1111 sampler names Novita documents (A1111 <= v1.8 semantics: the " Karras" suffix picks the schedule).
SAMPLER_NAMES: tuple[str, ...] = (
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2S a",
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM fast",
    "DPM adaptive",
    "LMS Karras",
    "DPM2 Karras",
    "DPM2 a Karras",
    "DPM++ 2S a Karras",
    "DPM++ 2M Karras",
    "DPM++ SDE Karras",
    "DDIM",
    "PLMS",
    "UniPC",
)


def _sampler_key(name: str) -> str:
    return "".join(name.lower().replace("_", " ").replace("-", " ").split())


_SAMPLER_LOOKUP = {_sampler_key(n): n for n in SAMPLER_NAMES}
# The Python SDK's ``Samplers.DPMPP_KARRAS`` ("DPM++ Karras") is not an A1111 name; it meant DPM++ 2M Karras.
_SAMPLER_LOOKUP[_sampler_key("DPM++ Karras")] = "DPM++ 2M Karras"


def normalize_sampler_name(name: str) -> str | None:
    """Canonical A1111 name for ``name`` (case, spaces, ``_``/``-`` ignored), or None if unknown."""
    if not isinstance(name, str):
        return None
    return _SAMPLER_LOOKUP.get(_sampler_key(name))
