"""Names the API and the engine share, in a module that imports nothing heavy (API nodes never import torch).

Two vocabularies, each normalised once at the edge (``api/schemas.py``) and carried as its own type after that:

* ``SamplerName``: the A1111 sampler names: the 20 Novita documents, the ten A1111 1.6 added (DPM++ 2M SDE,
  DPM++ 3M SDE and Restart families), and any sampler followed by a schedule label ("DPM++ SDE Exponential"), as
  A1111 >= 1.9 reads them;
* ``SchedulerName``: A1111 >= 1.9's "Schedule type" labels; ``resolve_sampler`` turns a (sampler, schedule type)
  pair into the sampler algorithm and the schedule it walks;
* ``PreprocessorName``: every ControlNet preprocessor this build runs, with the annotator weight files each needs
  (``PREPROCESSOR_FILES``). The engine's registry (``engine/preprocessors``) implements exactly these names, and a
  test holds the two to the same set.
"""

from __future__ import annotations

from pathlib import Path
from typing import NewType

SamplerName = NewType("SamplerName", str)
SchedulerName = NewType("SchedulerName", str)
PreprocessorName = NewType("PreprocessorName", str)

# The 20 A1111 sampler names Novita documents (A1111 <= v1.8 semantics: the " Karras" suffix picks the schedule),
# then the ten A1111 1.6 added (" Karras" / " Exponential" pick the schedule; Restart walks a Karras schedule).
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
        "DPM++ 2M SDE",
        "DPM++ 2M SDE Karras",
        "DPM++ 2M SDE Exponential",
        "DPM++ 2M SDE Heun",
        "DPM++ 2M SDE Heun Karras",
        "DPM++ 2M SDE Heun Exponential",
        "DPM++ 3M SDE",
        "DPM++ 3M SDE Karras",
        "DPM++ 3M SDE Exponential",
        "Restart",
    )
)

# A1111 >= 1.9's "Schedule type" labels. "Automatic" is each sampler's own default (``resolve_sampler``).
SCHEDULER_NAMES: tuple[SchedulerName, ...] = tuple(
    SchedulerName(n)
    for n in (
        "Automatic",
        "Uniform",
        "Karras",
        "Exponential",
        "Polyexponential",
        "SGM Uniform",
        "KL Optimal",
        "Align Your Steps",
        "Simple",
        "Normal",
        "DDIM",
        "Beta",
    )
)
AUTOMATIC = SchedulerName("Automatic")
_U, _K, _E = SchedulerName("Uniform"), SchedulerName("Karras"), SchedulerName("Exponential")

# Sampler algorithm -> (its schedule in A1111 <= 1.8, where a name without a suffix means it; the schedule
# "Automatic" means in A1111 >= 1.9, which changed several defaults). DDIM, PLMS and UniPC walk their own
# timestep grid whatever the schedule type; DPM fast/adaptive take only the schedule's ends.
SAMPLER_SCHEDULES: dict[SamplerName, tuple[SchedulerName, SchedulerName]] = {
    SamplerName(name): defaults
    for name, defaults in {
        "Euler a": (_U, _U),
        "Euler": (_U, _U),
        "LMS": (_U, _U),
        "Heun": (_U, _U),
        "DPM2": (_U, _K),
        "DPM2 a": (_U, _K),
        "DPM++ 2S a": (_U, _K),
        "DPM++ 2M": (_U, _K),
        "DPM++ SDE": (_U, _K),
        "DPM++ 2M SDE": (_U, _E),
        "DPM++ 2M SDE Heun": (_U, _E),
        "DPM++ 3M SDE": (_U, _E),
        "DPM fast": (_U, _U),
        "DPM adaptive": (_U, _U),
        "Restart": (_K, _K),
        "DDIM": (_U, _U),
        "PLMS": (_U, _U),
        "UniPC": (_U, _U),
    }.items()
}


# Hires fix's latent upscaler (bilinear latent interpolation, no antialias); any other name is an upscaler model.
LATENT_UPSCALER = "Latent"


def _sampler_key(name: str) -> str:
    return "".join(name.lower().replace("_", " ").replace("-", " ").split())


_SCHEDULER_LOOKUP: dict[str, SchedulerName] = {_sampler_key(n): n for n in SCHEDULER_NAMES}
_SCHEDULER_LOOKUP[_sampler_key("SGMUniform")] = SchedulerName("SGM Uniform")  # A1111's alias

_SAMPLER_LOOKUP: dict[str, SamplerName] = {_sampler_key(n): n for n in SAMPLER_NAMES}
# A1111 >= 1.9 splits a schedule label off the end of any sampler name ("Euler a Karras", "DPM++ SDE Exponential").
for _base in SAMPLER_SCHEDULES:
    for _label in SCHEDULER_NAMES[1:]:
        _SAMPLER_LOOKUP.setdefault(_sampler_key(f"{_base} {_label}"), SamplerName(f"{_base} {_label}"))
# The Python SDK's ``Samplers.DPMPP_KARRAS`` ("DPM++ Karras") is not an A1111 name; it meant DPM++ 2M Karras.
_SAMPLER_LOOKUP[_sampler_key("DPM++ Karras")] = SamplerName("DPM++ 2M Karras")


def normalize_sampler_name(name: object) -> SamplerName | None:
    """Canonical A1111 name for ``name`` (case, spaces, ``_``/``-`` ignored), or None if unknown."""
    if not isinstance(name, str):
        return None
    return _SAMPLER_LOOKUP.get(_sampler_key(name))


def normalize_scheduler_name(name: object) -> SchedulerName | None:
    """Canonical "Schedule type" label for ``name`` (case, spaces, ``_``/``-`` ignored: ``sgm_uniform`` is
    "SGM Uniform"), or None if unknown."""
    if not isinstance(name, str):
        return None
    return _SCHEDULER_LOOKUP.get(_sampler_key(name))


def split_sampler_name(name: SamplerName) -> tuple[SamplerName, SchedulerName | None]:
    """A canonical sampler name as (algorithm, schedule label of its suffix or None): "DPM++ 2M SDE Karras" is
    ("DPM++ 2M SDE", "Karras"), "DPM++ 2M SDE Heun" is itself with no suffix."""
    if name in SAMPLER_SCHEDULES:
        return name, None
    for label in sorted(SCHEDULER_NAMES[1:], key=len, reverse=True):  # "SGM Uniform" before "Uniform"
        base = name.removesuffix(" " + label)
        if base != name and base in SAMPLER_SCHEDULES:
            return SamplerName(base), label
    raise ValueError(f"unknown sampler {name!r}")


def sampler_algorithm(name: str) -> SamplerName | None:
    """The sampler algorithm a (possibly non-canonical) name runs, without its schedule ("DPM adaptive Karras" runs
    DPM adaptive), or None if unknown."""
    canonical = normalize_sampler_name(name)
    return None if canonical is None else split_sampler_name(canonical)[0]


def resolve_sampler(name: SamplerName, scheduler: SchedulerName | None) -> tuple[SamplerName, SchedulerName]:
    """The sampler algorithm and the schedule (never "Automatic") that ``name`` and the "Schedule type" mean.

    Without a schedule type (``None``: the request did not send one) the name means what it meant in A1111 <= 1.8:
    its suffix, else Uniform (Karras for Restart). With one, A1111 >= 1.9's rules: a suffix in the name wins,
    "Automatic" is the sampler's >= 1.9 default (Karras for DPM++ 2M, Exponential for DPM++ 2M SDE ...), any other
    label is used as given."""
    base, suffix = split_sampler_name(name)
    legacy, automatic = SAMPLER_SCHEDULES[base]
    if suffix is not None:
        return base, suffix
    if scheduler is None:
        return base, legacy
    return base, automatic if scheduler == AUTOMATIC else scheduler


def sampler_with_schedule(name: SamplerName, scheduler: SchedulerName | None) -> SamplerName:
    """One name for the engine that carries the schedule too: ``name`` itself without a schedule type, else
    "<algorithm> <schedule>" ("DPM++ 2M" + Automatic is "DPM++ 2M Karras", + SGM Uniform "DPM++ 2M SGM Uniform")."""
    if scheduler is None:
        return name
    base, schedule = resolve_sampler(name, scheduler)
    return SamplerName(f"{base} {schedule}")


def infotext_sampler(name: SamplerName, scheduler: SchedulerName | None) -> tuple[str, str | None]:
    """("Sampler", "Schedule type") as A1111 writes them in infotext: the name as given without a schedule type
    (A1111 <= 1.8), else the algorithm and the schedule it walks ("Sampler: DPM++ 2M, Schedule type: Karras")."""
    if scheduler is None:
        return name, None
    base, schedule = resolve_sampler(name, scheduler)
    return base, schedule


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
