"""Every preprocessor runs on the demo annotator files (``underpaint demo-models``), and where controlnet_aux has the
detector, our map equals the one controlnet_aux's own detector makes from the same files (its own loading, its
defaults, A1111's arguments); DWPose is compared with rtmlib's YOLOX + RTMPose on the same ONNX files.

The demo weights are seeded random values (not zero: see ``demo.annotators``), so the maps have structure and a
difference in loading, arguments or glue shows. The pictures are 128 px squares, so that detecting at the output
size (ours) and at ``detect_resolution=128`` (controlnet_aux's) mean the same input; the depth family runs at a
lowered detection resolution of 128 (192 for LeReS++, whose boosting needs it) on both sides, the real default
being 512 (``test_preprocessors.py`` checks that).

controlnet_aux's LeReS loader leaves the network in training mode; the reference is put in eval mode, as ours runs.
Tolerances: exact, except ``normal_bae`` (ours normalises in numpy, controlnet_aux in torch: at most 1 level) and
``openpose_hand``/``openpose_full`` (controlnet_aux draws the hand edges in matplotlib's float colours, we in
integers: at most 1 level on the hand lines).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.engine import preprocessors as P
from underpaint.engine.preprocessors import dwpose as D
from underpaint.engine.preprocessors.aux import aux
from underpaint.vocabulary import PREPROCESSOR_NAMES

SIZE = 128
DEPTH_RES = 128
BOOST_RES = 192
SEED = 7
SEED_ENUM = [
    "scribble_hed", "softedge_hed", "scribble_hedsafe", "softedge_hedsafe", "depth_midas", "mlsd", "openpose",
    "openpose_face", "openpose_faceonly", "openpose_full", "openpose_hand", "dwpose", "scribble_pidinet",
    "softedge_pidinet", "scribble_pidsafe", "softedge_pidsafe", "normal_bae", "lineart_coarse", "lineart_realistic",
    "lineart_anime", "lineart", "depth_zoe", "shuffle", "mediapipe_face", "canny", "depth", "depth_leres",
    "depth_leres++",
]  # fmt: skip
SLOW = {"depth_zoe", "depth_leres++"}  # BEiT-L twice; LeReS at up to 1568 px plus the 1024 px merge network


@pytest.fixture(scope="module")
def annotators(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "annotator"


@pytest.fixture(scope="module")
def nets() -> Iterator[P.AnnotatorCache]:
    """Our side's networks, built once per family for the whole module (as the executor's cache does): the last two
    loaded stay, so the variants of one family (six HED, seven PiDiNet, three MiDaS names) share one load. The
    heaviest (Zoe's BEiT-L alone is 1.4 GB) are dropped before their reference loads (``SLOW``)."""
    cache = P.AnnotatorCache(limit=2)
    yield cache
    cache.clear()
    gc.collect()


class OneFamily:
    """controlnet_aux's detector of one family at a time, loaded once for all of that family's names."""

    def __init__(self) -> None:
        self.family = ""
        self.detector: Any = None

    def get(self, family: str, load: Callable[[], Any]) -> Any:
        if family != self.family:
            self.family, self.detector = "", None
            gc.collect()
            self.detector, self.family = load(), family
        return self.detector


@pytest.fixture(scope="module")
def references() -> Iterator[OneFamily]:
    family = OneFamily()
    yield family
    family.family, family.detector = "", None
    gc.collect()


def picture(size: int = SIZE) -> np.ndarray:
    """Structure for every detector: a bright block, a dark bar, a diagonal line, a gradient and noise."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 200 // size, y * 200 // size, (x + y) * 100 // size], axis=2).astype(np.int32)
    arr[size // 5 : size // 2, size // 4 : 3 * size // 4] = (230, 60, 40)
    arr[3 * size // 5 : 3 * size // 5 + 6, size // 8 : 7 * size // 8] = 10
    arr[np.abs(x - y) < 2] = 250
    arr += rng.integers(0, 25, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def ours(
    name: str, annotators: Path, nets: P.AnnotatorCache, img: np.ndarray, depth_res: int = DEPTH_RES
) -> np.ndarray:
    context = P.Context(annotators, SEED, torch.device("cpu"), nets, depth_res)
    return np.asarray(P.run_preprocessor(name, Image.fromarray(img), context))


def assert_close(a: np.ndarray, b: np.ndarray, levels: int = 0) -> None:
    assert a.shape == b.shape
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert int(diff.max()) <= levels, (int(diff.max()), float(diff.mean()))


def rgb(out: Any) -> np.ndarray:
    arr = np.asarray(out)
    return np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr


# -- every name runs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PREPROCESSOR_NAMES - SLOW))  # SLOW ones run in the parity test below
def test_every_preprocessor_runs_on_the_demo_files(
    name: str, annotators: Path, nets: P.AnnotatorCache, tiny_models_dir: Path
) -> None:
    """Through the engine's ControlNet path: the unit's files are checked, the map is made and becomes the control
    image; it has the picture's size and, except where the demo nets find nobody, structure."""
    from underpaint.engine.adapters import controlnet as cn

    img = picture()
    out = ours(name, annotators, nets, img)
    assert out.shape == img.shape
    assert out.dtype == np.uint8
    blank = {"openpose", "openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full", "mediapipe_face"}
    if name not in blank:  # random OpenPose nets find no person, the picture has no face for mediapipe
        assert len(np.unique(out)) > 1, name
    P.check_files(name, annotators)
    assert cn.control_tensor(Image.fromarray(out), torch.device("cpu"), torch.float32).shape == (1, 3, *img.shape[:2])
    assert set(SEED_ENUM) <= PREPROCESSOR_NAMES
    assert set(PARITY) >= SLOW  # executed there


# -- parity with controlnet_aux's detectors ---------------------------------------------------------------------------


def _call(detector: Any, res: int = SIZE, **kwargs: Any) -> Callable[[np.ndarray], np.ndarray]:
    def run(img: np.ndarray) -> np.ndarray:
        out = detector(img, detect_resolution=res, image_resolution=res, output_type="np", **kwargs)
        return rgb(out[1] if isinstance(out, tuple) else out)

    return run


def _reference(name: str, folder: Path, family: OneFamily) -> Callable[[np.ndarray], np.ndarray]:
    """controlnet_aux's detector for ``name``, loaded by controlnet_aux from ``folder``, called as A1111 does."""
    d = str(folder)
    hed = {"hed": {}, "softedge_hed": {}, "softedge_hedsafe": {"safe": True}, "hed_safe": {"safe": True}}
    hed |= {"scribble_hed": {"scribble": True}, "scribble_hedsafe": {"scribble": True, "safe": True}}
    pidi = {"pidinet": {}, "softedge_pidinet": {}, "softedge_pidsafe": {"safe": True}, "pidinet_safe": {"safe": True}}
    pidi |= {"scribble_pidinet": {"scribble": True}, "pidinet_scribble": {"scribble": True}}
    pidi |= {"scribble_pidsafe": {"scribble": True, "safe": True}}

    def loaded(module: str, cls: str) -> Any:
        return family.get(module, lambda: getattr(aux(module), cls).from_pretrained(d))

    if name in hed:
        return _call(loaded("hed", "HEDdetector"), **hed[name])
    if name in pidi:
        return _call(loaded("pidi", "PidiNetDetector"), **pidi[name])
    if name == "mlsd":
        return _call(loaded("mlsd", "MLSDdetector"), thr_v=0.1, thr_d=0.1)
    if name in ("lineart", "lineart_realistic", "lineart_coarse"):
        return _call(loaded("lineart", "LineartDetector"), coarse=name == "lineart_coarse")
    if name == "lineart_anime":
        return _call(loaded("lineart_anime", "LineartAnimeDetector"))
    if name in ("depth", "depth_midas"):
        return _call(loaded("midas", "MidasDetector"), DEPTH_RES)
    if name == "normal_map":
        return _call(loaded("midas", "MidasDetector"), DEPTH_RES, depth_and_normal=True, bg_th=0.4)
    if name == "depth_zoe":
        return _call(loaded("zoe", "ZoeDetector"), DEPTH_RES)
    if name in ("depth_leres", "depth_leres++"):
        boost = name == "depth_leres++"
        return _call(
            family.get("leres", lambda: _leres(d)), BOOST_RES if boost else DEPTH_RES, thr_a=0, thr_b=0, boost=boost
        )
    if name == "normal_bae":
        return _call(loaded("normalbae", "NormalBaeDetector"))
    if name == "canny":
        return _call(aux("canny").CannyDetector(), low_threshold=100, high_threshold=200)
    if name == "shuffle":
        shuffle = aux("shuffle").ContentShuffleDetector()

        def seeded(img: np.ndarray) -> np.ndarray:
            np.random.seed(SEED)  # A1111 (and controlnet_aux) draw from numpy's global generator
            return rgb(shuffle(img, detect_resolution=SIZE, image_resolution=SIZE, output_type="np"))

        return seeded
    if name == "lineart_standard":
        standard = aux("lineart_standard").LineartStandardDetector()
        return lambda img: rgb(standard(img, guassian_sigma=6.0, intensity_threshold=8, detect_resolution=SIZE))
    raise AssertionError(name)


def _leres(folder: str) -> Any:
    """LeresDetector.from_pretrained parses the boosting script's options from sys.argv: give it none. It also
    leaves the depth network in training mode (BatchNorm on the image's own statistics, running statistics updated
    by every call); we run it in eval mode (docs/adapters.md), and so does the reference here."""
    argv = sys.argv
    sys.argv = ["leres"]
    try:
        detector = aux("leres").LeresDetector.from_pretrained(folder)
    finally:
        sys.argv = argv
    detector.model.eval()
    return detector


PARITY = [
    *("hed", "softedge_hed", "softedge_hedsafe", "hed_safe", "scribble_hed", "scribble_hedsafe"),
    *("pidinet", "softedge_pidinet", "softedge_pidsafe", "pidinet_safe", "scribble_pidinet", "pidinet_scribble"),
    *("scribble_pidsafe", "mlsd", "lineart", "lineart_realistic", "lineart_coarse", "lineart_anime"),
    *("depth", "depth_midas", "normal_map", "depth_zoe", "depth_leres", "depth_leres++", "normal_bae"),
    *("canny", "shuffle", "lineart_standard"),
]
TOLERANCE = {"normal_bae": 1}


@pytest.mark.parity
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in PARITY])
def test_map_equals_controlnet_aux(name: str, annotators: Path, nets: P.AnnotatorCache, references: OneFamily) -> None:
    img = picture(BOOST_RES if name == "depth_leres++" else SIZE)
    mine = ours(name, annotators, nets, img, BOOST_RES if name == "depth_leres++" else DEPTH_RES)
    if name in SLOW:  # the largest networks: one side's in memory at a time
        nets.clear()
        gc.collect()
    with torch.no_grad():
        reference = _reference(name, annotators, references)(img)
    assert len(np.unique(reference)) > 1  # a map with structure: the comparison means something
    assert_close(mine, reference, TOLERANCE.get(name, 0))


def test_shuffle_is_seeded_by_the_task_seed(annotators: Path, nets: P.AnnotatorCache) -> None:
    img = picture()
    a = ours("shuffle", annotators, nets, img)
    other = P.Context(annotators, SEED + 1, torch.device("cpu"), nets)
    assert not np.array_equal(a, np.asarray(P.run_preprocessor("shuffle", Image.fromarray(img), other)))
    np.random.seed(0)
    before = np.random.random(4)
    np.random.seed(0)
    ours("shuffle", annotators, nets, img)
    assert np.array_equal(np.random.random(4), before)  # numpy's global generator is left alone


# -- OpenPose: our glue and controlnet_aux's detector on the same detections -----------------------------------------

# One standing person in a 128 x 128 image, OpenPose's 18 body keypoints (pixels).
PERSON = [
    (64, 25), (64, 40), (50, 40), (45, 57), (42, 75), (78, 40), (83, 57), (86, 75), (55, 75),
    (54, 95), (53, 115), (73, 75), (74, 95), (75, 115), (60, 22), (68, 22), (56, 24), (72, 24),
]  # fmt: skip


@pytest.fixture
def detections(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo OpenPose nets find nobody; give both sides the same detections through controlnet_aux's estimator
    classes (which both use), so that the comparison covers cropping, peaks and drawing."""
    body, hand, face = aux("open_pose.body").Body, aux("open_pose.hand").Hand, aux("open_pose.face").Face
    candidate = np.array([[x, y, 0.9, i] for i, (x, y) in enumerate(PERSON)], dtype=np.float64)
    subset = np.array([[*range(18), 16.0, 18.0]])
    monkeypatch.setattr(body, "__call__", lambda self, img: (candidate, subset))
    monkeypatch.setattr(hand, "__call__", lambda self, crop: np.array([[2.0 + i, 3.0 + i % 5] for i in range(21)]))

    def heatmaps(self: object, crop: np.ndarray) -> np.ndarray:
        maps = np.zeros((71, *crop.shape[:2]), np.float32)
        for k in range(70):  # one landmark per heatmap, on a small ring
            a = 2 * np.pi * k / 70
            maps[
                k,
                int(crop.shape[0] / 2 + crop.shape[0] / 4 * np.sin(a)),
                int(crop.shape[1] / 2 + crop.shape[1] / 4 * np.cos(a)),
            ] = 1.0
        return maps

    monkeypatch.setattr(face, "__call__", heatmaps)


@pytest.mark.parity
@pytest.mark.parametrize(
    ("name", "parts", "levels"),
    [
        ("openpose", {"include_body": True}, 0),
        ("openpose_face", {"include_body": True, "include_face": True}, 0),
        ("openpose_faceonly", {"include_body": False, "include_face": True}, 0),
        ("openpose_hand", {"include_body": True, "include_hand": True}, 1),
        ("openpose_full", {"include_body": True, "include_hand": True, "include_face": True}, 1),
    ],
)
def test_openpose_equals_controlnet_aux(
    name: str,
    parts: dict[str, bool],
    levels: int,
    annotators: Path,
    nets: P.AnnotatorCache,
    references: OneFamily,
    detections: None,
) -> None:
    img = picture()
    detector = references.get("open_pose", lambda: aux("open_pose").OpenposeDetector.from_pretrained(str(annotators)))
    reference = rgb(detector(img, detect_resolution=SIZE, image_resolution=SIZE, output_type="np", **parts))
    mine = ours(name, annotators, nets, img)
    assert reference.max() > 0
    assert_close(mine, reference, levels)


# -- DWPose against rtmlib ---------------------------------------------------------------------------------------------


@pytest.mark.parity
def test_dwpose_equals_rtmlib(annotators: Path, nets: P.AnnotatorCache) -> None:
    """rtmlib's YOLOX and RTMPose (DWPose's published inference, as a package) on the demo ONNX files: the same
    person boxes and the same 133 keypoints and scores. (A keypoint's score: DWPose's published code and mmpose take
    the smaller of its x and y maxima, rtmlib their mean; the demo estimator's two maxima are equal.)"""
    from rtmlib import YOLOX, RTMPose

    img = picture(256)[:, :200]
    bgr = np.ascontiguousarray(img[:, :, ::-1])
    yolox = YOLOX(
        str(annotators / D.DETECTOR), model_input_size=D.DETECTOR_INPUT, score_thr=D.THRESHOLD, nms_thr=D.NMS_IOU
    )
    pose = RTMPose(str(annotators / D.ESTIMATOR), model_input_size=D.ESTIMATOR_INPUT[::-1])
    ref_boxes = np.asarray(yolox(bgr))
    context = P.Context(annotators, SEED, torch.device("cpu"), nets)
    boxes = D.detect_people(D._session(context, annotators / D.DETECTOR), bgr)
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes, ref_boxes, atol=1e-3)
    ref_points, ref_scores = pose(bgr, bboxes=list(ref_boxes))
    points, scores = D.estimate(D._session(context, annotators / D.ESTIMATOR), bgr, boxes[0])
    np.testing.assert_allclose(points, ref_points[0], atol=1e-3)
    np.testing.assert_allclose(scores, ref_scores[0], atol=1e-6)
    drawn = ours("dwpose", annotators, nets, img)
    assert drawn.max() > 0
