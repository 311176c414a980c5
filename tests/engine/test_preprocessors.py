"""ControlNet preprocessors: the registry over the vocabulary, weight-free maps, network annotators from local
weights in the published layouts, their glue (map direction, detection size), clear errors.

Parity with controlnet_aux's own detectors on the same files is in ``test_preprocessors_parity.py``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.engine import preprocessors as P
from underpaint.engine.job import JobError
from underpaint.engine.preprocessors import networks
from underpaint.engine.preprocessors.aux import aux
from underpaint.vocabulary import (
    BODY_POSE_FILE,
    FACE_POSE_FILE,
    HAND_POSE_FILE,
    PREPROCESSOR_FILES,
    PREPROCESSOR_NAMES,
    PreprocessorName,
    missing_annotator_files,
)

StateDict = dict[str, torch.Tensor]

SEED_ENUM = [
    "scribble_hed",
    "softedge_hed",
    "scribble_hedsafe",
    "softedge_hedsafe",
    "depth_midas",
    "mlsd",
    "openpose",
    "openpose_face",
    "openpose_faceonly",
    "openpose_full",
    "openpose_hand",
    "dwpose",
    "scribble_pidinet",
    "softedge_pidinet",
    "scribble_pidsafe",
    "softedge_pidsafe",
    "normal_bae",
    "lineart_coarse",
    "lineart_realistic",
    "lineart_anime",
    "lineart",
    "depth_zoe",
    "shuffle",
    "mediapipe_face",
    "canny",
    "depth",
    "depth_leres",
    "depth_leres++",
]


@pytest.fixture
def picture() -> Image.Image:
    rng = np.random.default_rng(3)
    arr = np.zeros((96, 128, 3), np.uint8)
    arr[20:70, 30:90] = (200, 40, 40)  # a red block gives canny real edges
    arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
    return Image.fromarray(arr)


def ctx(tmp: Path, seed: int = 1, nets: P.AnnotatorCache | None = None, depth_resolution: int = 512) -> P.Context:
    return P.Context(tmp, seed, torch.device("cpu"), nets or P.AnnotatorCache(), depth_resolution)


def missing(name: str, folder: Path) -> list[str]:
    return missing_annotator_files(PreprocessorName(name), folder)


def test_the_registry_implements_exactly_the_vocabulary() -> None:
    assert set(P.PREPROCESSORS) == PREPROCESSOR_NAMES
    assert set(SEED_ENUM) <= PREPROCESSOR_NAMES
    assert len(SEED_ENUM) == 28


def test_unknown_name_is_a_job_error(picture: Image.Image, tmp_path: Path) -> None:
    for name in ("no_such_preprocessor", "segmentation", "clip_vision"):
        with pytest.raises(JobError, match="not supported"):
            P.run_preprocessor(name, picture, ctx(tmp_path))
        with pytest.raises(JobError, match="not supported"):
            P.check_files(name, tmp_path)


def test_canny_is_a1111_canny(picture: Image.Image, tmp_path: Path) -> None:
    out = np.asarray(P.run_preprocessor("canny", picture, ctx(tmp_path)))
    expected = cv2.Canny(np.asarray(picture), 100, 200)
    assert out.shape == (96, 128, 3)
    assert np.array_equal(out[:, :, 0], expected)
    assert out.max() == 255


def test_none_is_identity(picture: Image.Image, tmp_path: Path) -> None:
    for name in (None, "none"):
        assert np.array_equal(np.asarray(P.run_preprocessor(name, picture, ctx(tmp_path))), np.asarray(picture))


def test_shuffle_is_seeded(picture: Image.Image, tmp_path: Path) -> None:
    a = np.asarray(P.run_preprocessor("shuffle", picture, ctx(tmp_path, 1)))
    b = np.asarray(P.run_preprocessor("shuffle", picture, ctx(tmp_path, 1)))
    c = np.asarray(P.run_preprocessor("shuffle", picture, ctx(tmp_path, 2)))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, np.asarray(picture))


def test_simple_maps(picture: Image.Image, tmp_path: Path) -> None:
    arr = np.asarray(picture)
    assert np.array_equal(np.asarray(P.run_preprocessor("invert", picture, ctx(tmp_path))), 255 - arr)
    thr = np.asarray(P.run_preprocessor("threshold", picture, ctx(tmp_path)))
    assert set(np.unique(thr)) <= {0, 255}


def test_network_annotator_runs_from_local_weights(picture: Image.Image, tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(networks.hed_net().state_dict(), tmp_path / "ControlNetHED.pth")
    soft = np.asarray(P.run_preprocessor("softedge_hed", picture, ctx(tmp_path)))
    scribble = np.asarray(P.run_preprocessor("scribble_hed", picture, ctx(tmp_path)))
    assert soft.shape == scribble.shape == (96, 128, 3)
    assert set(np.unique(scribble)) <= {0, 255}  # scribble maps are binary
    assert len(np.unique(soft)) > 2


def test_missing_annotator_names_file_and_folder(picture: Image.Image, tmp_path: Path) -> None:
    with pytest.raises(JobError) as err:
        P.run_preprocessor("mlsd", picture, ctx(tmp_path))
    assert "mlsd_large_512_fp32.pth" in str(err.value)
    assert str(tmp_path) in str(err.value)
    assert missing("lineart", tmp_path) == ["sk_model.pth", "sk_model2.pth"]
    with pytest.raises(JobError, match=r"sk_model2\.pth"):
        P.check_files("lineart_coarse", tmp_path)
    P.check_files("canny", tmp_path)
    P.check_files(None, tmp_path)


def test_other_weight_free_maps(picture: Image.Image, tmp_path: Path) -> None:
    arr = np.asarray(picture)
    gray = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    otsu = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
    assert np.array_equal(np.asarray(P.run_preprocessor("binary", picture, ctx(tmp_path)))[:, :, 1], otsu)
    assert np.array_equal(np.asarray(P.run_preprocessor("tile_resample", picture, ctx(tmp_path))), arr)
    big = Image.fromarray(np.asarray(picture.resize((256, 192))))
    color = np.asarray(P.run_preprocessor("color", big, ctx(tmp_path)))
    # a 64x mosaic: 4x3 flat cells of one colour each
    assert color.shape == (192, 256, 3)
    assert len(np.unique(color.reshape(-1, 3), axis=0)) <= 12
    assert (color[:64, :64] == color[0, 0]).all()
    block = np.zeros((96, 128, 3), np.uint8)
    block[30:60, 40:80] = 255
    xdog = np.asarray(P.run_preprocessor("scribble_xdog", Image.fromarray(block), ctx(tmp_path)))[:, :, 0]
    # white lines on black along the block's outline, nothing in the flat areas
    assert set(np.unique(xdog)) == {0, 255}
    assert xdog[29, 60] == 255
    assert xdog[0, 0] == 0
    assert xdog[45, 60] == 0


# -- OpenPose ------------------------------------------------------------------------------------------------------

# One standing person in a 256 x 256 image, OpenPose's 18 body keypoints (nose, neck, R arm, L arm, R leg, L leg,
# eyes, ears) in pixels.
PERSON = [
    (128, 50), (128, 80), (100, 80), (90, 115), (85, 150), (156, 80), (166, 115), (171, 150), (110, 150),
    (108, 190), (106, 230), (146, 150), (148, 190), (150, 230), (120, 44), (136, 44), (112, 48), (144, 48),
]  # fmt: skip


def _openpose_weights(folder: Path) -> None:
    from underpaint.demo.annotators import write_torch_annotator

    for i, name in enumerate((BODY_POSE_FILE, HAND_POSE_FILE, FACE_POSE_FILE)):
        write_torch_annotator(name, folder, seed=i)


def test_openpose_family_runs_from_local_weights(tmp_path: Path) -> None:
    """Every OpenPose variant loads its files and runs detection end to end (random nets find nobody here)."""
    _openpose_weights(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    for name in ("openpose_full", "openpose_faceonly"):  # all three files; the body net runs (~3 s each)
        out = np.asarray(P.run_preprocessor(name, image, ctx(tmp_path)))
        assert out.shape == (96, 128, 3), name
        assert out.max() == 0, name


def test_openpose_glue_draws_detected_person(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a detected person, body drawing, hand crops and the face crop go through our glue."""
    _openpose_weights(tmp_path)
    candidate = np.array([[x, y, 0.9, i] for i, (x, y) in enumerate(PERSON)], dtype=np.float64)
    subset = np.array([[*range(18), 16.0, 18.0]])
    body_cls, hand_cls, face_cls = aux("open_pose.body").Body, aux("open_pose.hand").Hand, aux("open_pose.face").Face
    monkeypatch.setattr(body_cls, "__call__", lambda self, img: (candidate, subset))
    hand_crops: list[tuple[int, ...]] = []
    face_crops: list[tuple[int, ...]] = []

    def hand_call(self: object, crop: np.ndarray) -> np.ndarray:
        hand_crops.append(crop.shape)
        return np.array([[4.0 + i, 4.0 + i] for i in range(21)])  # a diagonal "hand" inside the crop

    def face_call(self: object, crop: np.ndarray) -> np.ndarray:
        face_crops.append(crop.shape)
        return np.zeros((71, *crop.shape[:2]), np.float32)  # heatmaps of the crop's size, no landmarks

    monkeypatch.setattr(hand_cls, "__call__", hand_call)
    monkeypatch.setattr(face_cls, "__call__", face_call)
    image = Image.new("RGB", (256, 256), (90, 90, 90))
    maps = {n: np.asarray(P.run_preprocessor(n, image, ctx(tmp_path))) for n in ("openpose", "openpose_hand")}
    assert maps["openpose"].max() > 0
    assert len(hand_crops) == 2
    assert (maps["openpose_hand"] != maps["openpose"]).any()  # the hands were drawn on top
    full = np.asarray(P.run_preprocessor("openpose_full", image, ctx(tmp_path)))
    # the face crop was looked at, and no landmarks found: nothing more drawn
    assert np.array_equal(full, maps["openpose_hand"])
    assert len(face_crops) == 1


def test_openpose_needs_only_the_files_of_its_parts(tmp_path: Path) -> None:
    body, hand, face = BODY_POSE_FILE, HAND_POSE_FILE, FACE_POSE_FILE
    assert missing("openpose", tmp_path) == [body]
    assert missing("openpose_hand", tmp_path) == [body, hand]
    assert missing("openpose_full", tmp_path) == [body, hand, face]
    assert missing("openpose_faceonly", tmp_path) == [body, face]


def test_broken_annotator_file_is_a_clear_error(picture: Image.Image, tmp_path: Path) -> None:
    (tmp_path / "table5_pidinet.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(JobError, match=r"table5_pidinet\.pth could not be loaded"):
        P.run_preprocessor("softedge_pidinet", picture, ctx(tmp_path))


# -- depth and normal maps (MiDaS, Zoe, LeReS): the glue around the networks --------------------------------------
# (the published-layout files load in test_preprocessors_parity.py, into ours and into controlnet_aux's detectors)

MIDAS, ZOE = PREPROCESSOR_FILES[PreprocessorName("depth")], PREPROCESSOR_FILES[PreprocessorName("depth_zoe")]
LERES_BOOST = PREPROCESSOR_FILES[PreprocessorName("depth_leres++")]


class FakeNet(torch.nn.Module):
    """Stands in for an annotator network: ``output(x)`` gives the prediction; the inputs are recorded."""

    def __init__(self, output: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the detectors read the device off a parameter
        self.output, self.inputs = output, list[torch.Tensor]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return self.output(x)

    depth_model = infer = forward  # LeReS and Zoe entry points


class FakeNets(P.AnnotatorCache):
    """An annotator cache that hands out fake networks by kind instead of loading files."""

    def __init__(self, nets: dict[str, FakeNet]) -> None:
        super().__init__()
        self.nets = nets

    def get(self, kind: str, path: Path, device: str, load: Callable[[], Any]) -> Any:
        return self.nets[kind]


def ramp(x: torch.Tensor, top: float = 1.0) -> torch.Tensor:
    """A prediction growing from 0 (left) to ``top`` (right), (1, H, W)."""
    return torch.linspace(0, top, x.shape[3]).expand(1, x.shape[2], x.shape[3])


def present(folder: Path, files: tuple[str, ...]) -> Path:
    for name in files:
        (folder / name).write_bytes(b"")  # present; the fake cache never reads them
    return folder


def test_depth_leres_maps_near_to_white(tmp_path: Path) -> None:
    net = FakeNet(lambda x: ramp(x)[None])  # depth grows from left to right
    image = Image.new("RGB", (128, 64), (80, 80, 80))
    folder = present(tmp_path, ("res101.pth",))
    out = np.asarray(P.run_preprocessor("depth_leres", image, ctx(folder, nets=FakeNets({"leres": net}))))
    gray = out[:, :, 0].astype(int)
    assert gray[:, 0].min() >= 250
    assert gray[:, -1].max() <= 5
    assert (np.diff(gray[32]) <= 0).all()
    assert net.inputs[0].shape == (1, 3, 512, 1024)  # A1111's resolution: the short side at 512


@pytest.mark.slow  # boosting blurs a 3000 x 3000 blending mask on every call
def test_depth_leres_boost_merges_through_the_merge_network(tmp_path: Path) -> None:
    """Both depth estimates go into the merge network (as its 2 input channels); its output is the map."""
    depth = FakeNet(lambda x: ramp(x)[None])
    merge = FakeNet(lambda pair: pair[:, 1:])  # passes the high-resolution estimate through
    nets = FakeNets({"leres": depth, "leres_merge": merge})
    image = Image.new("RGB", (128, 64), (80, 80, 80))
    out = np.asarray(P.run_preprocessor("depth_leres++", image, ctx(present(tmp_path, LERES_BOOST), nets=nets)))
    gray = out[:, :, 0].astype(int)
    assert len(merge.inputs) == 1
    assert merge.inputs[0].shape == (1, 2, 1024, 1024)
    # LeReS at its receptive field, then at the resolution boosting picks (a flat image: the largest, 49 x 32)
    assert [tuple(x.shape[2:]) for x in depth.inputs] == [(448, 448), (1568, 1568)]
    assert gray[:, 0].min() >= 250
    assert gray[:, -1].max() <= 5
    assert (np.diff(gray[32]) <= 0).all()


def test_midas_maps_near_to_white(tmp_path: Path) -> None:
    net = FakeNet(ramp)  # MiDaS predicts inverse depth: here nearer to the right
    image = Image.new("RGB", (128, 64), (80, 80, 80))
    out = np.asarray(P.run_preprocessor("depth", image, ctx(present(tmp_path, MIDAS), nets=FakeNets({"midas": net}))))
    gray = out[:, :, 0].astype(int)
    assert gray[:, 0].max() <= 5
    assert gray[:, -1].min() >= 250
    assert (np.diff(gray[32]) >= 0).all()
    x = net.inputs[0]
    assert x.shape == (1, 3, 512, 1024)
    assert float(x.min()) >= -1
    assert float(x.max()) <= 1
    assert float(x[0, 0, 0, 0]) == pytest.approx(80 / 127.5 - 1, abs=0.01)


def test_normal_map_leaves_the_background_flat(tmp_path: Path) -> None:
    """A1111's background threshold 0.4: where the depth is below 40% of its range the normal faces the camera;
    elsewhere the slope of the depth tilts it (x goes to the blue channel)."""
    nets = FakeNets({"midas": FakeNet(lambda x: ramp(x, top=4 * x.shape[3]))})
    image = Image.new("RGB", (100, 64), (80, 80, 80))
    out = np.asarray(P.run_preprocessor("normal_map", image, ctx(present(tmp_path, MIDAS), nets=nets)))
    row = out[32].astype(int)
    assert (row[5:35] == (255, 127, 127)).all()  # background: flat
    assert (row[45:95, 2] >= 245).all()
    assert (abs(row[45:95, 1] - 127) <= 1).all()


def test_zoe_maps_near_to_white(tmp_path: Path) -> None:
    net = FakeNet(lambda x: ramp(x)[None])  # Zoe predicts metric depth: here farther to the right
    image = Image.new("RGB", (128, 64), (80, 80, 80))
    out = np.asarray(P.run_preprocessor("depth_zoe", image, ctx(present(tmp_path, ZOE), nets=FakeNets({"zoe": net}))))
    gray = out[:, :, 0].astype(int)
    # normalised between the 2nd and 85th percentiles: the nearest columns white, the farthest 15% black
    assert gray[:, 0].min() >= 250
    assert (gray[:, -15:] == 0).all()
    assert (np.diff(gray[32]) <= 0).all()
    x = net.inputs[0]
    assert x.shape == (1, 3, 512, 1024)
    assert float(x[0, 0, 0, 0]) == pytest.approx(80 / 255, abs=0.01)


def test_depth_resolution_is_the_contexts(tmp_path: Path) -> None:
    net = FakeNet(ramp)
    image = Image.new("RGB", (128, 64), (80, 80, 80))
    folder = present(tmp_path, MIDAS)
    P.run_preprocessor("depth", image, ctx(folder, nets=FakeNets({"midas": net}), depth_resolution=128))
    assert net.inputs[0].shape == (1, 3, 128, 256)


def test_depth_files_are_named_when_missing(picture: Image.Image, tmp_path: Path) -> None:
    cases = [("depth", MIDAS), ("normal_map", MIDAS), ("depth_zoe", ZOE), ("depth_leres++", LERES_BOOST)]
    for name, files in cases:
        with pytest.raises(JobError) as err:
            P.run_preprocessor(name, picture, ctx(tmp_path))
        assert all(f in str(err.value) for f in files), name
        assert str(tmp_path) in str(err.value), name
    (tmp_path / "res101.pth").write_bytes(b"")
    assert missing("depth_leres++", tmp_path) == ["latest_net_G.pth"]
    assert missing("depth_leres", tmp_path) == []


def test_cache_loads_once_and_reloads_a_replaced_file(picture: Image.Image, tmp_path: Path) -> None:
    from underpaint.demo.annotators import write_torch_annotator

    write_torch_annotator("table5_pidinet.pth", tmp_path, seed=1)
    nets = P.AnnotatorCache(limit=1)
    first = np.asarray(P.run_preprocessor("softedge_pidinet", picture, ctx(tmp_path, nets=nets)))
    assert np.array_equal(np.asarray(P.run_preprocessor("pidinet", picture, ctx(tmp_path, nets=nets))), first)
    assert nets.loads == 1
    path = write_torch_annotator("table5_pidinet.pth", tmp_path, seed=2)
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 5))  # a new file version
    second = np.asarray(P.run_preprocessor("softedge_pidinet", picture, ctx(tmp_path, nets=nets)))
    assert nets.loads == 2
    assert not np.array_equal(first, second)
    torch.save(networks.hed_net().state_dict(), tmp_path / "ControlNetHED.pth")
    P.run_preprocessor("hed", picture, ctx(tmp_path, nets=nets))
    assert nets.kinds() == {"hed"}  # limit 1: PiDiNet was dropped


def test_controlnet_aux_top_level_init_is_never_run() -> None:
    """Its __init__ imports every detector; segment_anything's import overwrites entries of timm's registry."""
    import sys

    from underpaint.engine.preprocessors.aux import install_namespace

    aux("hed")
    aux("zoe")
    install_namespace()  # idempotent: the namespace stays the one registered first
    assert "controlnet_aux.segment_anything" not in sys.modules
    assert not hasattr(sys.modules["controlnet_aux"], "__file__") or sys.modules["controlnet_aux"].__file__ is None
