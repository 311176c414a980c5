"""mediapipe_face: mediapipe 0.10.14's bundled face mesh with controlnet_aux's drawing, on a real photograph that
ships with scikit-image (NASA's portrait of astronaut Eileen Collins)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from underpaint.engine import preprocessors as P
from underpaint.vocabulary import PreprocessorName, missing_annotator_files

RIGHT_PUPIL, LEFT_PUPIL = 468, 473  # refined iris landmarks
# controlnet_aux's drawing colours, given as BGR there, in the RGB map
OVAL, RIGHT_PUPIL_RGB, LEFT_PUPIL_RGB = (10, 200, 10), (250, 200, 10), (10, 200, 250)


def ctx(folder: Path) -> P.Context:
    return P.Context(annotator_dir=folder, seed=0, device=torch.device("cpu"))


def _landmarks(rgb: np.ndarray, faces: int) -> list[np.ndarray]:
    """The face mesh's landmarks (478 x 2, pixels) per face, straight from mediapipe."""
    import mediapipe as mp

    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=faces, refine_landmarks=True) as mesh:
        found = mesh.process(rgb).multi_face_landmarks or []
    h, w = rgb.shape[:2]
    return [np.array([(p.x * w, p.y * h) for p in face.landmark]) for face in found]


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut())  # type: ignore[no-untyped-call]  # 512 x 512 RGB


def _inside(mask: np.ndarray, points: np.ndarray, margin: int = 3) -> bool:
    ys, xs = np.nonzero(mask)
    (x0, y0), (x1, y1) = points.min(axis=0) - margin, points.max(axis=0) + margin
    return bool(((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)).all())


@pytest.mark.parity
def test_mediapipe_face_draws_the_face(astronaut: np.ndarray, tmp_path: Path) -> None:
    (points,) = _landmarks(astronaut, 1)
    out = np.asarray(P.run_preprocessor("mediapipe_face", Image.fromarray(astronaut), ctx(tmp_path)))
    drawn = np.asarray(out.any(axis=2))
    assert out.shape == (512, 512, 3)
    assert drawn.sum() > 1000
    assert _inside(drawn, points)  # only the face's contours, nothing elsewhere
    colours = {tuple(c) for c in out[drawn].tolist()}
    assert OVAL in colours
    for index, colour in ((RIGHT_PUPIL, RIGHT_PUPIL_RGB), (LEFT_PUPIL, LEFT_PUPIL_RGB)):
        x, y = points[index].astype(int)
        assert tuple(out[y, x].tolist()) == colour, index


@pytest.mark.parity
def test_mediapipe_face_draws_one_face_at_most(astronaut: np.ndarray, tmp_path: Path) -> None:
    """A1111's default max_faces=1: of two faces, one is drawn."""
    face = astronaut[:256, 128:384]
    pair = np.ascontiguousarray(np.concatenate([face, face[:, ::-1]], axis=1))  # 512 x 256, two faces
    faces = _landmarks(pair, 2)
    assert len(faces) == 2
    out = np.asarray(P.run_preprocessor("mediapipe_face", Image.fromarray(pair), ctx(tmp_path)))
    drawn = np.asarray(out.any(axis=2))
    assert drawn.sum() > 500
    assert sum(_inside(drawn, f) for f in faces) == 1


def test_mediapipe_face_without_a_face_is_black(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    out = np.asarray(P.run_preprocessor("mediapipe_face", Image.fromarray(noise), ctx(tmp_path)))
    assert out.shape == (96, 128, 3)
    assert out.max() == 0
    assert missing_annotator_files(PreprocessorName("mediapipe_face"), tmp_path) == []
