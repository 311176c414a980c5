"""DWPose from the published ONNX pair: decoding against hand-computed values, and the whole pipeline on tiny ONNX
models with the real input/output names and shapes whose outputs the test controls."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from underpaint.demo.annotators import fixed_onnx
from underpaint.engine import preprocessors as P
from underpaint.engine.job import JobError
from underpaint.engine.preprocessors import dwpose as D
from underpaint.vocabulary import PreprocessorName, missing_annotator_files

DET_SHAPE, POSE_SHAPE = (1, 3, 640, 640), (1, 3, 384, 288)
ANCHORS = 80 * 80 + 40 * 40 + 20 * 20  # strides 8, 16, 32 on 640
CLASSES = 80
X_BINS, Y_BINS = 288 * 2, 384 * 2

# One standing person facing the viewer in a 256 x 256 image: COCO's 17 body keypoints in pixels (nose, L/R eye,
# L/R ear, L/R shoulder, L/R elbow, L/R wrist, L/R hip, L/R knee, L/R ankle; the person's left is on image right).
COCO_BODY = [
    (128, 50), (136, 44), (120, 44), (144, 48), (112, 48), (156, 80), (100, 80), (166, 115), (90, 115),
    (171, 150), (85, 150), (146, 150), (110, 150), (148, 190), (108, 190), (150, 230), (106, 230),
]  # fmt: skip
# The same person in OpenPose's order, with the neck between the shoulders.
OPENPOSE_BODY = [
    (128, 50), (128, 80), (100, 80), (90, 115), (85, 150), (156, 80), (166, 115), (171, 150), (110, 150),
    (108, 190), (106, 230), (146, 150), (148, 190), (150, 230), (120, 44), (136, 44), (112, 48), (144, 48),
]  # fmt: skip
# draw_bodypose's colours, per OpenPose keypoint (and per limb).
COLOURS = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0), (0, 255, 85),
    (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255), (170, 0, 255),
    (255, 0, 255), (255, 0, 170), (255, 0, 85),
]  # fmt: skip
BOX = (60.0, 20.0, 196.0, 240.0)  # the person's box in the 256 x 256 image


# -- tiny ONNX models ------------------------------------------------------------------------------------------------


def _anchor(stride: int, gx: int, gy: int, size: int = 640) -> int:
    offset = sum((size // s) ** 2 for s in D.STRIDES if s < stride)
    return offset + gy * (size // stride) + gx


def _yolox_row(raw: np.ndarray, box: tuple[float, ...], ratio: float, obj: float, cls: dict[int, float]) -> None:
    """Write ``box`` (image pixels), as YOLOX encodes it, into the first free anchor (strides 32, 16, 8) whose cell
    holds its centre."""
    x1, y1, x2, y2 = (v * ratio for v in box)
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    for s in (32, 16, 8):
        gx, gy = int(cx // s), int(cy // s)
        row = raw[0, _anchor(s, gx, gy)]
        if not row.any():
            break
    row[:4] = (cx / s - gx, cy / s - gy, math.log(w / s), math.log(h / s))
    row[4] = obj
    for c, score in cls.items():
        row[5 + c] = score


def _write_detector(folder: Path, rows: list[tuple[tuple[float, ...], float, dict[int, float]]], ratio: float) -> None:
    raw = np.zeros((1, ANCHORS, 5 + CLASSES), np.float32)
    for box, obj, cls in rows:
        _yolox_row(raw, box, ratio, obj, cls)
    onnx.save(fixed_onnx("images", DET_SHAPE, {"output": raw}), folder / D.DETECTOR)


def _bins(box: tuple[float, ...], x: float, y: float) -> tuple[int, int]:
    """The SimCC bins of image point (x, y) for a person in ``box``: the crop is the box x 1.25 made 288:384 (here
    heightwise: width = 0.75 x height), scaled by 288 / crop width, centred on the input; two bins per pixel."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    crop_w = max((box[2] - box[0]) * 1.25, (box[3] - box[1]) * 1.25 * 0.75)
    s = 288 / crop_w
    return round(((x - cx) * s + 144) * 2), round(((y - cy) * s + 192) * 2)


def _write_estimator(folder: Path, points: dict[int, tuple[float, float, float]], box: tuple[float, ...] = BOX) -> None:
    """An estimator whose SimCC peaks put COCO-WholeBody keypoint k at ``points[k]`` = (x, y, score) for the person
    in ``box``; every other keypoint peaks at bin 0 with score 0.05."""
    sx, sy = np.zeros((1, 133, X_BINS), np.float32), np.zeros((1, 133, Y_BINS), np.float32)
    sx[0, :, 0] = sy[0, :, 0] = 0.05
    for k, (x, y, score) in points.items():
        bx, by = _bins(box, x, y)
        sx[0, k, :] = sy[0, k, :] = 0
        sx[0, k, bx], sy[0, k, by] = score, score
    onnx.save(fixed_onnx("input", POSE_SHAPE, {"simcc_x": sx, "simcc_y": sy}), folder / D.ESTIMATOR)


def ctx(folder: Path) -> P.Context:
    return P.Context(annotator_dir=folder, seed=0, device=torch.device("cpu"))


# -- decoding units --------------------------------------------------------------------------------------------------


def test_yolox_decode_on_a_64px_grid() -> None:
    """64 x 64 input: 8x8 cells at stride 8, 4x4 at 16, 2x2 at 32, in that order, rows then columns."""
    cells, strides = D.yolox_grid((64, 64))
    assert len(cells) == 64 + 16 + 4
    assert cells[9].tolist() == [1, 1]
    assert strides[9, 0] == 8
    assert cells[73].tolist() == [1, 2]
    assert strides[73, 0] == 16
    raw = np.zeros((84, 5 + 3), np.float32)
    raw[73, :4] = (0.5, 0.25, math.log(2), 0.0)  # centre (1.5, 2.25) cells, size 2 x 1 cells
    raw[73, 4:] = (0.8, 0.5, 0.25, 1.0)
    boxes, scores = D.yolox_decode(raw, (64, 64))
    # centre (24, 36), size 32 x 16 → (8, 28, 40, 44); scores = objectness x class
    assert np.allclose(boxes[73], (8, 28, 40, 44))
    assert np.allclose(scores[73], (0.4, 0.2, 0.8))
    with pytest.raises(ValueError, match="84"):
        D.yolox_decode(raw[:80], (64, 64))


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 99, 99], [5, 5, 104, 104], [200, 200, 299, 299], [0, 0, 49, 99]], np.float32)
    scores = np.array([0.8, 0.9, 0.5, 0.7], np.float32)
    # box 1 (best) suppresses box 0 (IoU 0.82); box 3 overlaps box 1 by 45 x 95 / (10000 + 5000 - 4275) = 0.40
    assert D.nms(boxes, scores, 0.45) == [1, 3, 2]


def test_letterbox_top_left_with_grey_padding() -> None:
    bgr = np.zeros((100, 50, 3), np.uint8)
    bgr[..., 0] = 200  # blue channel first: channels are passed through unchanged
    blob, ratio = D.letterbox(bgr, (640, 640))
    assert ratio == 6.4
    assert blob.shape == (1, 3, 640, 640)
    assert blob.dtype == np.float32
    assert blob[0, :, 10, 10].tolist() == [200, 0, 0]
    assert blob[0, :, 10, 330].tolist() == [114, 114, 114]  # right of the 320-pixel-wide image


def test_simcc_decode_hand_computed() -> None:
    sx = np.array([[0.1, 0.9, 0.2, 0.0], [0.0, 0.0, 0.0, 0.4]], np.float32)
    sy = np.array([[0.0, 0.3, 0.0, 0.7, 0.1, 0.0], [0.6, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    points, scores = D.simcc_decode(sx, sy)
    assert points.tolist() == [[0.5, 1.5], [1.5, 0.0]]  # arg-max bins / 2
    assert np.allclose(scores, [0.7, 0.4])  # the smaller of the two maxima
    points, scores = D.simcc_decode(np.zeros((1, 4), np.float32), sy[:1])
    assert points.tolist() == [[-0.5, -0.5]]  # no response on x: unset, as mmpose marks it


def test_crop_transform_hand_computed() -> None:
    # box 100 x 200 → x 1.25 = 125 x 250 → widened to 288:384 = 187.5 x 250; scale 288 / 187.5
    centre, ext, matrix = D.crop_transform(np.array([10.0, 20.0, 110.0, 220.0]), (384, 288))
    assert centre.tolist() == [60, 120]
    assert np.allclose(ext, (187.5, 250))
    assert np.allclose(matrix @ [60, 120, 1], (144, 192))
    assert np.allclose(matrix @ [60 - 93.75, 120 - 125, 1], (0, 0))
    assert np.allclose(matrix @ [60 + 93.75, 120 + 125, 1], (288, 384))


def test_to_openpose_reorders_and_adds_the_neck() -> None:
    points = np.zeros((133, 2), np.float32)
    scores = np.full(133, 0.9, np.float32)
    points[:17] = COCO_BODY
    points[91], points[112] = (1, 2), (3, 4)  # left wrist-root of the left hand, right hand's
    points[23] = (7, 8)  # the first face point
    pose = D.to_openpose(points, scores)
    assert pose.body.tolist() == [list(p) for p in OPENPOSE_BODY]
    assert pose.body_scores[1] == 1.0  # both shoulders confident
    assert pose.hands[0, 0].tolist() == [1, 2]
    assert pose.hands[1, 0].tolist() == [3, 4]
    assert pose.face.shape == (68, 2)
    assert pose.face[0].tolist() == [7, 8]
    assert pose.feet.shape == (6, 2)
    scores[6] = 0.2  # the right shoulder is not: no neck
    assert D.to_openpose(points, scores).body_scores[1] == 0.0


# -- the pipeline on tiny ONNX files --------------------------------------------------------------------------------


def test_detector_finds_persons_only_above_threshold_after_nms(tmp_path: Path) -> None:
    ratio = 640 / 256
    other = (10.0, 150.0, 50.0, 250.0)
    _write_detector(
        tmp_path,
        [
            (BOX, 0.9, {0: 0.95}),
            ((62.0, 24.0, 198.0, 242.0), 0.9, {0: 0.8}),  # the same person again, lower: suppressed
            (other, 0.8, {0: 0.75}),  # a second person
            ((200.0, 10.0, 250.0, 60.0), 0.9, {0: 0.05, 5: 0.9}),  # a bus
            ((200.0, 150.0, 250.0, 250.0), 0.5, {0: 0.5}),  # 0.25: below the threshold
        ],
        ratio,
    )
    boxes = D.detect_people(D._session(ctx(tmp_path), tmp_path / D.DETECTOR), np.zeros((256, 256, 3), np.uint8))
    assert np.allclose(boxes, [BOX, other], atol=0.01)


def _person_points() -> dict[int, tuple[float, float, float]]:
    points: dict[int, tuple[float, float, float]] = {k: (x, y, 0.9) for k, (x, y) in enumerate(COCO_BODY)}
    points[15] = (*COCO_BODY[15], 0.2)  # left ankle: not confident
    points[23] = (128.0, 62.0, 0.8)  # one face point (chin)
    points[24] = (60.0, 200.0, 0.1)  # a face point below the threshold
    for i in range(21):  # the left hand fans out from the left wrist
        points[91 + i] = (176.0 + i, 156.0 + i // 2, 0.7)
    for i in range(21):  # the right hand is not confident
        points[112 + i] = (70.0, 170.0 + i, 0.2)
    return points


def test_dwpose_draws_the_detected_person(tmp_path: Path) -> None:
    _write_detector(tmp_path, [(BOX, 0.9, {0: 0.95})], 640 / 256)
    _write_estimator(tmp_path, _person_points())
    image = Image.new("RGB", (256, 256), (90, 90, 90))
    out = np.asarray(P.run_preprocessor("dwpose", image, ctx(tmp_path))).astype(int)
    assert out.shape == (256, 256, 3)
    for j, (x, y) in enumerate(OPENPOSE_BODY):
        if j == 13:  # the left ankle scored 0.2: neither its point nor its limb is drawn
            assert out[y, x].tolist() == [0, 0, 0]
            assert out[(190 + 230) // 2, 149].tolist() == [0, 0, 0]
        else:
            assert out[y, x].tolist() == list(COLOURS[j]), (j, out[y, x])
    # limbs are drawn at 60 %: the right upper arm (shoulder → elbow) in limb colour 2
    assert out[(80 + 115) // 2, (100 + 90) // 2].tolist() == [153, 102, 0]
    assert out[62, 128].tolist() == [255, 255, 255]  # the confident face point, white
    assert out[200, 60].tolist() == [0, 0, 0]  # the unconfident one
    assert out[156, 176].tolist() == [0, 0, 255]  # the left hand's joints, blue
    assert out[180, 70].tolist() == [0, 0, 0]  # the unconfident right hand


def test_dwpose_without_a_person_is_black(tmp_path: Path) -> None:
    _write_detector(tmp_path, [((10.0, 10.0, 100.0, 100.0), 0.9, {0: 0.2})], 640 / 256)  # 0.18: nobody
    _write_estimator(tmp_path, _person_points())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    out = np.asarray(P.run_preprocessor("dwpose", image, ctx(tmp_path)))
    assert out.shape == (96, 128, 3)
    assert out.max() == 0


def test_dwpose_needs_both_files_by_name(tmp_path: Path) -> None:
    dwpose = PreprocessorName("dwpose")
    assert missing_annotator_files(dwpose, tmp_path) == ["yolox_l.onnx", "dw-ll_ucoco_384.onnx"]
    _write_detector(tmp_path, [], 1.0)
    assert missing_annotator_files(dwpose, tmp_path) == ["dw-ll_ucoco_384.onnx"]
    with pytest.raises(JobError) as err:
        P.run_preprocessor("dwpose", Image.new("RGB", (64, 64)), ctx(tmp_path))
    assert "dw-ll_ucoco_384.onnx" in str(err.value)
    assert "yolox_l.onnx" not in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_dwpose_wrong_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / D.DETECTOR).write_bytes(b"not an onnx file")
    _write_estimator(tmp_path, {})
    with pytest.raises(JobError, match=r"yolox_l\.onnx could not be loaded"):
        P.run_preprocessor("dwpose", Image.new("RGB", (64, 64)), ctx(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    # a detector with the wrong number of anchors (a 320 input's) behind a 640 input
    raw = np.zeros((1, 2100, 85), np.float32)
    onnx.save(fixed_onnx("images", DET_SHAPE, {"output": raw}), other / D.DETECTOR)
    _write_estimator(other, {})
    with pytest.raises(JobError, match="does not look like the YOLOX detector"):
        P.run_preprocessor("dwpose", Image.new("RGB", (64, 64)), ctx(other))
    body_only = tmp_path / "body_only"  # an RTMPose body model (17 keypoints) in the estimator's place
    body_only.mkdir()
    _write_detector(body_only, [(BOX, 0.9, {0: 0.95})], 640 / 256)
    simcc = {"simcc_x": np.zeros((1, 17, X_BINS), np.float32), "simcc_y": np.zeros((1, 17, Y_BINS), np.float32)}
    onnx.save(fixed_onnx("input", POSE_SHAPE, simcc), body_only / D.ESTIMATOR)
    with pytest.raises(JobError, match="does not look like DWPose's whole-body estimator"):
        P.run_preprocessor("dwpose", Image.new("RGB", (256, 256)), ctx(body_only))
