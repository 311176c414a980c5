"""MediaPipe face mesh (``mediapipe_face``): the outline, eyes, brows, lips and pupils of one face on black.

Detection and drawing are controlnet_aux's ``mediapipe_face`` annotator (A1111's), with A1111's defaults: at most one
face, detection confidence 0.5, faces under 64 px dropped. The face-mesh models come inside the mediapipe wheel, so
no annotator file is needed.

mediapipe has to be 0.10.14: newer releases (1.x) have no ``solutions`` API. Its protobuf-4 graph configs fail to
parse on protobuf 5 and later. scripts/bootstrap installs it ``--no-deps``: it declares opencv-contrib-python, jax
and sounddevice, which the face mesh never imports. What it does import is pinned in pyproject.toml, protobuf
4.25.8 among it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from underpaint.engine.job import JobError
from underpaint.engine.preprocessors.aux import aux
from underpaint.engine.preprocessors.context import Context

Array = np.ndarray

MAX_FACES = 1
MIN_CONFIDENCE = 0.5


def _common() -> Any:
    """``controlnet_aux.mediapipe_face.mediapipe_face_common`` (imports mediapipe)."""
    try:
        module = aux("mediapipe_face.mediapipe_face_common")
    except Exception as exc:  # a mediapipe that does not fit this build (protobuf, numpy ...)
        raise JobError(f"preprocessor 'mediapipe_face' could not load mediapipe: {exc!r}") from exc
    if module.mp is None:  # the module swallows the ImportError
        raise JobError("preprocessor 'mediapipe_face' needs mediapipe 0.10.14 (scripts/bootstrap installs it)")
    return module


def mediapipe_face(img: Array, ctx: Context) -> Array:
    """The face-mesh map of ``img`` (RGB) at its size; black without a face."""
    out = _common().generate_annotation(np.ascontiguousarray(img), MAX_FACES, MIN_CONFIDENCE)
    return np.asarray(out, np.uint8)
