"""ControlNet preprocessors: weight-free maps, network annotators from local weights, clear errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.engine import preprocessors as P
from underpaint.engine.job import JobError

SEED_ENUM = [
    "scribble_hed", "softedge_hed", "scribble_hedsafe", "softedge_hedsafe", "depth_midas", "mlsd", "openpose",
    "openpose_face", "openpose_faceonly", "openpose_full", "openpose_hand", "dwpose", "scribble_pidinet",
    "softedge_pidinet", "scribble_pidsafe", "softedge_pidsafe", "normal_bae", "lineart_coarse", "lineart_realistic",
    "lineart_anime", "lineart", "depth_zoe", "shuffle", "mediapipe_face", "canny", "depth", "depth_leres",
    "depth_leres++",
]


@pytest.fixture()
def picture() -> Image.Image:
    rng = np.random.default_rng(3)
    arr = np.zeros((96, 128, 3), np.uint8)
    arr[20:70, 30:90] = (200, 40, 40)  # a red block gives canny real edges
    arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
    return Image.fromarray(arr)


def ctx(tmp: Path, seed: int = 1) -> P.Context:
    return P.Context(annotator_dir=tmp, seed=seed, device=torch.device("cpu"))


def test_every_seed_enum_name_is_known() -> None:
    for name in SEED_ENUM:
        assert name in P.PREPROCESSORS, name


def test_canny_is_a1111_canny(picture: Image.Image, tmp_path: Path) -> None:
    out = np.asarray(P.run_preprocessor("canny", picture, ctx(tmp_path)))
    expected = cv2.Canny(np.asarray(picture), 100, 200)
    assert out.shape == (96, 128, 3)
    assert np.array_equal(out[:, :, 0], expected) and out.max() == 255


def test_none_is_identity(picture: Image.Image, tmp_path: Path) -> None:
    for name in (None, "none"):
        assert np.array_equal(np.asarray(P.run_preprocessor(name, picture, ctx(tmp_path))), np.asarray(picture))


def test_shuffle_is_seeded(picture: Image.Image, tmp_path: Path) -> None:
    a = np.asarray(P.run_preprocessor("shuffle", picture, ctx(tmp_path, 1)))
    b = np.asarray(P.run_preprocessor("shuffle", picture, ctx(tmp_path, 1)))
    c = np.asarray(P.run_preprocessor("shuffle", picture, ctx(tmp_path, 2)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, np.asarray(picture))


def test_simple_maps(picture: Image.Image, tmp_path: Path) -> None:
    arr = np.asarray(picture)
    assert np.array_equal(np.asarray(P.run_preprocessor("invert", picture, ctx(tmp_path))), 255 - arr)
    thr = np.asarray(P.run_preprocessor("threshold", picture, ctx(tmp_path)))
    assert set(np.unique(thr)) <= {0, 255}


def test_network_annotator_runs_from_local_weights(picture: Image.Image, tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(P._aux("hed").ControlNetHED_Apache2().state_dict(), tmp_path / "ControlNetHED.pth")
    soft = np.asarray(P.run_preprocessor("softedge_hed", picture, ctx(tmp_path)))
    scribble = np.asarray(P.run_preprocessor("scribble_hed", picture, ctx(tmp_path)))
    assert soft.shape == scribble.shape == (96, 128, 3)
    assert set(np.unique(scribble)) <= {0, 255}  # scribble maps are binary
    assert len(np.unique(soft)) > 2


def test_missing_annotator_names_file_and_folder(picture: Image.Image, tmp_path: Path) -> None:
    with pytest.raises(JobError) as err:
        P.run_preprocessor("mlsd", picture, ctx(tmp_path))
    assert "mlsd_large_512_fp32.pth" in str(err.value) and str(tmp_path) in str(err.value)
    assert P.missing_files("lineart", tmp_path) == ["sk_model.pth", "sk_model2.pth"]


def test_unsupported_and_unknown_are_clear(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="torchvision"):
        P.check("depth_midas", tmp_path)
    with pytest.raises(JobError, match="not supported"):
        P.check("no_such_preprocessor", tmp_path)
