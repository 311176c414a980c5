"""The preprocessor registry: every name of ``underpaint.vocabulary.PREPROCESSOR_NAMES`` -> its implementation.

The vocabulary (torch-free) is the single list of names and of the annotator files each needs; the API validates
requests against it and refuses missing files at submit. This registry implements exactly those names (checked at
import and by a test), and checks the files again when a task runs: they may have gone since submit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from underpaint.engine.job import JobError
from underpaint.engine.preprocessors import dwpose, maps, mediapipe_face, networks, openpose
from underpaint.engine.preprocessors.context import Context
from underpaint.vocabulary import (
    PREPROCESSOR_FILES,
    PREPROCESSOR_NAMES,
    PreprocessorName,
    missing_annotator_files,
    missing_annotator_message,
    normalize_preprocessor_name,
)

Array = np.ndarray
Run = Callable[[Array, Context], Array]


def _files(name: str) -> tuple[str, ...]:
    return PREPROCESSOR_FILES[PreprocessorName(name)]


def _table() -> dict[str, Run]:
    hed, pidi, lineart = _files("softedge_hed"), _files("softedge_pidinet"), _files("lineart")
    midas, leres_boost = _files("depth_midas"), _files("depth_leres++")
    detect = networks.detect
    return {
        # weight-free
        "canny": maps.canny,
        "shuffle": maps.shuffle,
        "lineart_standard": maps.lineart_standard,
        "invert": maps.invert,
        "threshold": maps.threshold,
        "binary": maps.binary,
        "color": maps.color,
        "scribble_xdog": maps.scribble_xdog,
        "tile_resample": maps.tile_resample,
        "mediapipe_face": mediapipe_face.mediapipe_face,
        # HED and PiDiNet, with the Python SDK's A1111 aliases
        "softedge_hed": detect("hed", hed),
        "hed": detect("hed", hed),
        "softedge_hedsafe": detect("hed", hed, safe=True),
        "hed_safe": detect("hed", hed, safe=True),
        "scribble_hed": detect("hed", hed, scribble=True),
        "scribble_hedsafe": detect("hed", hed, scribble=True, safe=True),
        "softedge_pidinet": detect("pidinet", pidi),
        "pidinet": detect("pidinet", pidi),
        "softedge_pidsafe": detect("pidinet", pidi, safe=True),
        "pidinet_safe": detect("pidinet", pidi, safe=True),
        "scribble_pidinet": detect("pidinet", pidi, scribble=True),
        "pidinet_scribble": detect("pidinet", pidi, scribble=True),
        "scribble_pidsafe": detect("pidinet", pidi, scribble=True, safe=True),
        "mlsd": detect("mlsd", _files("mlsd")),
        "lineart": detect("lineart", lineart),
        "lineart_realistic": detect("lineart", lineart),
        "lineart_coarse": detect("lineart", lineart, coarse=True),
        "lineart_anime": detect("lineart_anime", _files("lineart_anime")),
        # depth and normals (detected at A1111's resolution)
        "depth": detect("midas", midas, depth=True),  # A1111's "depth" is MiDaS
        "depth_midas": detect("midas", midas, depth=True),
        "normal_map": detect("midas", midas, depth=True, depth_and_normal=True, bg_th=networks.NORMAL_MAP_BACKGROUND),
        "depth_zoe": detect("zoe", _files("depth_zoe"), depth=True),
        "depth_leres": detect("leres", _files("depth_leres"), depth=True),  # both thresholds at 0
        "depth_leres++": detect("leres", leres_boost, depth=True, boost=True),
        "normal_bae": networks.normal_bae(_files("normal_bae")),
        # poses
        "openpose": openpose.detector(body=True, hand=False, face=False),
        "openpose_hand": openpose.detector(body=True, hand=True, face=False),
        "openpose_face": openpose.detector(body=True, hand=False, face=True),
        "openpose_faceonly": openpose.detector(body=False, hand=False, face=True),
        "openpose_full": openpose.detector(body=True, hand=True, face=True),
        "dwpose": dwpose.dwpose,
    }


PREPROCESSORS: dict[PreprocessorName, Run] = {PreprocessorName(k): v for k, v in _table().items()}
if PREPROCESSORS.keys() != PREPROCESSOR_NAMES:  # the vocabulary and the registry are one list
    raise ImportError(f"preprocessor registry != vocabulary: {sorted(PREPROCESSORS.keys() ^ PREPROCESSOR_NAMES)}")


def _resolve(name: str | None) -> PreprocessorName | None:
    try:
        return normalize_preprocessor_name(name)
    except ValueError:
        raise JobError(f"preprocessor {name!r} is not supported by this server") from None


def run_preprocessor(name: str | None, image: Image.Image, ctx: Context) -> Image.Image:
    """The control map for ``image`` (already at the output size), same size, RGB. ``None``/``none``: the image.

    Raises ``JobError`` for an unknown name and for annotator files missing from ``ctx.annotator_dir`` (naming
    them and the folder)."""
    key = _resolve(name)
    if key is None:
        return image.convert("RGB")
    missing = missing_annotator_files(key, ctx.annotator_dir)
    if missing:
        raise JobError(missing_annotator_message(key, missing, ctx.annotator_dir))
    arr = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    with torch.no_grad():
        out = PREPROCESSORS[key](arr, ctx)
    result = Image.fromarray(np.ascontiguousarray(out).astype(np.uint8)).convert("RGB")
    if result.size != image.size:
        result = result.resize(image.size, Image.Resampling.BILINEAR)
        if key.startswith("scribble"):  # scribble maps are binary: keep them so after resizing
            result = result.point(lambda v: 255 if v > 127 else 0)
    return result


def check_files(name: str | None, annotator_dir: Path) -> None:
    """Raise ``JobError`` for an unknown name or missing annotator files (the executor checks every unit before
    it loads anything)."""
    key = _resolve(name)
    missing = missing_annotator_files(key, annotator_dir)
    if key is not None and missing:
        raise JobError(missing_annotator_message(key, missing, annotator_dir))
