"""Names the API and the engine share, in a module that imports nothing heavy (API nodes never import torch).

Two vocabularies, each normalised once at the edge (``api/schemas.py``) and carried as its own type after that:

* ``SamplerName``: the 20 A1111 sampler names Novita documents;
* ``PreprocessorName``: every ControlNet preprocessor this build runs, with the annotator weight files each needs
  (``PREPROCESSOR_FILES``). The engine's registry (``engine/preprocessors``) implements exactly these names, and a
  test holds the two to the same set.
"""

from __future__ import annotations

from pathlib import Path
from typing import NewType

SamplerName = NewType("SamplerName", str)
PreprocessorName = NewType("PreprocessorName", str)

# The 20 A1111 sampler names Novita documents (A1111 <= v1.8 semantics: the " Karras" suffix picks the schedule).
SAMPLER_NAMES: tuple[SamplerName, ...] = tuple(
    SamplerName(n)
    for n in (
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
)


# Hires fix's latent upscaler (bilinear latent interpolation, no antialias); any other name is an upscaler model.
LATENT_UPSCALER = "Latent"


def _sampler_key(name: str) -> str:
    return "".join(name.lower().replace("_", " ").replace("-", " ").split())


_SAMPLER_LOOKUP: dict[str, SamplerName] = {_sampler_key(n): n for n in SAMPLER_NAMES}
# The Python SDK's ``Samplers.DPMPP_KARRAS`` ("DPM++ Karras") is not an A1111 name; it meant DPM++ 2M Karras.
_SAMPLER_LOOKUP[_sampler_key("DPM++ Karras")] = SamplerName("DPM++ 2M Karras")


def normalize_sampler_name(name: object) -> SamplerName | None:
    """Canonical A1111 name for ``name`` (case, spaces, ``_``/``-`` ignored), or None if unknown."""
    if not isinstance(name, str):
        return None
    return _SAMPLER_LOOKUP.get(_sampler_key(name))


# -- ControlNet preprocessors ---------------------------------------------------------------------------------

# Annotator weight files, as published with lllyasviel's ControlNet annotators, looked up in ``<models>/annotator/``.
_HED = ("ControlNetHED.pth",)
_PIDI = ("table5_pidinet.pth",)
_MLSD = ("mlsd_large_512_fp32.pth",)
_LINEART = ("sk_model.pth", "sk_model2.pth")
_LINEART_ANIME = ("netG.pth",)
_MIDAS = ("dpt_hybrid-midas-501f0c75.pt",)
_ZOE = ("ZoeD_M12_N.pt",)
_LERES = ("res101.pth",)
_LERES_BOOST = ("res101.pth", "latest_net_G.pth")
_NORMAL_BAE = ("scannet.pt",)
BODY_POSE_FILE, HAND_POSE_FILE, FACE_POSE_FILE = "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"
_BODY, _HAND, _FACE = BODY_POSE_FILE, HAND_POSE_FILE, FACE_POSE_FILE
_DWPOSE = ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")

# Every preprocessor name this build runs -> the annotator files it needs. The docs/JS SDK vocabulary and the
# Python SDK's A1111 names (``hed``, ``pidinet`` ...) are both here.
PREPROCESSOR_FILES: dict[PreprocessorName, tuple[str, ...]] = {
    PreprocessorName(name): files
    for name, files in {
        # weight-free
        "canny": (),
        "shuffle": (),
        "invert": (),
        "threshold": (),
        "binary": (),
        "color": (),
        "scribble_xdog": (),
        "tile_resample": (),
        "lineart_standard": (),
        "mediapipe_face": (),  # its models ship inside the mediapipe wheel
        # networks
        "softedge_hed": _HED,
        "hed": _HED,
        "softedge_hedsafe": _HED,
        "hed_safe": _HED,
        "scribble_hed": _HED,
        "scribble_hedsafe": _HED,
        "softedge_pidinet": _PIDI,
        "pidinet": _PIDI,
        "softedge_pidsafe": _PIDI,
        "pidinet_safe": _PIDI,
        "scribble_pidinet": _PIDI,
        "pidinet_scribble": _PIDI,
        "scribble_pidsafe": _PIDI,
        "mlsd": _MLSD,
        "lineart": _LINEART,
        "lineart_realistic": _LINEART,
        "lineart_coarse": _LINEART,
        "lineart_anime": _LINEART_ANIME,
        "depth": _MIDAS,  # A1111's "depth" is MiDaS
        "depth_midas": _MIDAS,
        "normal_map": _MIDAS,
        "depth_zoe": _ZOE,
        "depth_leres": _LERES,
        "depth_leres++": _LERES_BOOST,
        "normal_bae": _NORMAL_BAE,
        "openpose": (_BODY,),
        "openpose_hand": (_BODY, _HAND),
        "openpose_face": (_BODY, _FACE),
        "openpose_faceonly": (_BODY, _FACE),
        "openpose_full": (_BODY, _HAND, _FACE),
        "dwpose": _DWPOSE,
    }.items()
}
PREPROCESSOR_NAMES: frozenset[PreprocessorName] = frozenset(PREPROCESSOR_FILES)


def normalize_preprocessor_name(name: str | None) -> PreprocessorName | None:
    """The preprocessor ``name`` means, or None for "use the image as the control map" (no name, ``none``).

    Raises ``ValueError`` for a name this build does not run."""
    if name is None:
        return None
    key = name.strip().lower()
    if key in ("", "none"):
        return None
    if key not in PREPROCESSOR_FILES:
        raise ValueError(key)
    return PreprocessorName(key)


def missing_annotator_files(name: PreprocessorName | None, annotator_dir: Path) -> list[str]:
    """The weight files ``name`` needs that are not in ``annotator_dir`` (empty when it can run)."""
    if name is None:
        return []
    return [f for f in PREPROCESSOR_FILES[name] if not (annotator_dir / f).is_file()]


def missing_annotator_message(name: PreprocessorName, missing: list[str], annotator_dir: Path) -> str:
    return (
        f"preprocessor {name!r} needs the annotator weights {', '.join(missing)}: "
        f"put them in {annotator_dir} (the models folder's annotator/ directory)"
    )
