"""DWPose (``dwpose``): whole-body pose from the two ONNX files published with DWPose, drawn as an OpenPose map.

Our implementation of DWPose's published ONNX inference (the one A1111's ControlNet extension runs):

1. Person detection with YOLOX-L (``yolox_l.onnx``, input 1x3x640x640). The input is the BGR image, scaled to fit
   into the top-left corner of a 640 square padded with 114, not normalised. There is one output row per anchor of
   the stride 8/16/32 grids: box centre offset and log size in grid units, objectness, and 80 class scores (already
   sigmoid). A person's score is objectness x class 0. Boxes scoring above 0.3 go through NMS (IoU 0.45).
2. Top-down whole-body keypoints with ``dw-ll_ucoco_384.onnx`` (RTMPose-style, input 1x3x384x288), once per box.
   The box is enlarged 1.25x and made wider or taller to 288:384, then warped onto the input. The input is
   normalised with the ImageNet mean/std on the 0-255 scale; like the published code, it keeps the BGR order. For
   each of the 133 COCO-WholeBody keypoints, the SimCC outputs score every half pixel along x (576 bins) and y
   (768 bins). The keypoint sits at the two arg-maxima / 2; its score is the smaller of the two maxima.
3. Conversion to OpenPose: the 18-point body (neck = mean of the shoulders, COCO order → OpenPose order), 6 foot
   points, 68 face points and 2 x 21 hand points. A point scoring below 0.3 is left out.
4. Drawing with controlnet_aux's DWPose helpers: body, hands and face on black. The feet are not drawn, as there.

If nobody is detected, the map is black. ONNX runtime runs on the CPU, with the process's torch thread count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from underpaint.engine.job import JobError
from underpaint.engine.preprocessors.aux import aux
from underpaint.engine.preprocessors.context import Context
from underpaint.vocabulary import PREPROCESSOR_FILES, PreprocessorName

Array = np.ndarray

FILES = PREPROCESSOR_FILES[PreprocessorName("dwpose")]
DETECTOR, ESTIMATOR = FILES  # yolox_l.onnx, dw-ll_ucoco_384.onnx

THRESHOLD = 0.3  # person box score and keypoint score, as in DWPose
NMS_IOU = 0.45
PERSON = 0  # COCO class index
PAD_VALUE = 114
STRIDES = (8, 16, 32)
BOX_PADDING = 1.25
SIMCC_SPLIT = 2.0  # SimCC bins per input pixel
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
# (h, w), used when a file leaves its input size dynamic.
DETECTOR_INPUT = (640, 640)
ESTIMATOR_INPUT = (384, 288)

# COCO-WholeBody layout: 17 body, 6 feet, 68 face, 21 left hand, 21 right hand.
KEYPOINTS = 133
FEET, FACE = slice(17, 23), slice(23, 91)
LEFT_HAND, RIGHT_HAND = slice(91, 112), slice(112, 133)
_SHOULDERS = [5, 6]
# The COCO index of each OpenPose body point (nose, neck, right arm, left arm, right leg, left leg, eyes, ears); the
# neck is not a COCO point: index KEYPOINTS is the shoulders' midpoint appended to the 133.
_OPENPOSE_BODY = [0, KEYPOINTS, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]


@dataclass(frozen=True)
class Pose:
    """One person's keypoints in image pixels (x, y) and their scores; the body in OpenPose's order."""

    body: Array  # (18, 2)
    body_scores: Array  # (18,)
    feet: Array  # (6, 2)
    feet_scores: Array
    face: Array  # (68, 2)
    face_scores: Array
    hands: Array  # (2, 21, 2): left, right
    hand_scores: Array  # (2, 21)


# -- detection (YOLOX) ------------------------------------------------------------------------------------------


def letterbox(bgr: Array, size: tuple[int, int]) -> tuple[Array, float]:
    """YOLOX's input for ``bgr``: scaled to fit ``size`` (h, w), top-left on a 114-grey canvas, NCHW float32; and
    the scale factor."""
    h, w = bgr.shape[:2]
    ratio = min(size[0] / h, size[1] / w)
    nh, nw = max(int(h * ratio), 1), max(int(w * ratio), 1)
    canvas = np.full((*size, 3), PAD_VALUE, np.uint8)
    canvas[:nh, :nw] = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32), ratio


def yolox_grid(size: tuple[int, int], strides: Sequence[int] = STRIDES) -> tuple[Array, Array]:
    """Each anchor's grid cell (x, y) and its stride, in YOLOX's output order: strides ascending, then rows, then
    columns."""
    cells, steps = [], []
    for stride in strides:
        gy, gx = np.mgrid[0 : size[0] // stride, 0 : size[1] // stride]
        cells.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
        steps.append(np.full(gx.size, stride))
    return np.concatenate(cells).astype(np.float32), np.concatenate(steps).astype(np.float32)[:, None]


def yolox_decode(raw: Array, size: tuple[int, int]) -> tuple[Array, Array]:
    """YOLOX rows ``(anchors, 5 + classes)`` for an input of ``size`` → boxes (x1, y1, x2, y2) in input pixels and
    per-class scores (objectness x class score)."""
    cells, strides = yolox_grid(size)
    if raw.ndim != 2 or raw.shape[0] != len(cells) or raw.shape[1] < 5 + PERSON + 1:
        raise ValueError(f"expected ({len(cells)}, 5 + classes) rows for a {size[1]}x{size[0]} input, got {raw.shape}")
    centre = (raw[:, :2] + cells) * strides
    half = np.exp(raw[:, 2:4]) * strides / 2
    return np.concatenate([centre - half, centre + half], axis=1), raw[:, 4:5] * raw[:, 5:]


def nms(boxes: Array, scores: Array, iou: float) -> list[int]:
    """Greedy non-maximum suppression, best score first; areas counted in whole pixels (+1), as YOLOX does."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i, rest = int(order[0]), order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return keep


def detect_people(session: Any, bgr: Array) -> Array:
    """Person boxes (n, 4), x1 y1 x2 y2 in image pixels, best first."""
    size = _input_hw(session, DETECTOR_INPUT)
    blob, ratio = letterbox(bgr, size)
    raw = _run(session, DETECTOR, blob)[0]
    try:
        boxes, scores = yolox_decode(np.asarray(raw, np.float32).reshape(-1, raw.shape[-1]), size)
    except ValueError as exc:
        raise JobError(f"{DETECTOR} does not look like the YOLOX detector DWPose uses: {exc}") from exc
    person = scores[:, PERSON]
    found = person > THRESHOLD
    boxes, person = boxes[found] / ratio, person[found]
    return boxes[nms(boxes, person, NMS_IOU)]


# -- keypoints (top-down SimCC estimator) ------------------------------------------------------------------------


def crop_transform(box: Array, size: tuple[int, int]) -> tuple[Array, Array, Array]:
    """The top-down crop of ``box`` for an input of ``size`` (h, w): the crop's centre and extent (w, h) in image
    pixels (the box enlarged by 1.25, then widened or heightened to the input's aspect ratio), and the 2x3 affine
    matrix image → input."""
    h, w = size
    centre = (box[:2] + box[2:]) / 2
    ext = (box[2:] - box[:2]) * BOX_PADDING
    aspect = w / h
    ext = np.array([ext[0], ext[0] / aspect] if ext[0] > ext[1] * aspect else [ext[1] * aspect, ext[1]])
    s = w / ext[0]
    matrix = np.array([[s, 0, w / 2 - s * centre[0]], [0, s, h / 2 - s * centre[1]]], np.float64)
    return centre, ext, matrix


def simcc_decode(simcc_x: Array, simcc_y: Array, split: float = SIMCC_SPLIT) -> tuple[Array, Array]:
    """SimCC ``(K, Wx)`` and ``(K, Wy)`` → keypoints (K, 2) in input pixels (arg-max bin / split ratio; bin -1
    where the score is not positive) and scores (K,): the smaller of the two maxima, as mmpose's
    ``get_simcc_maximum`` and DWPose's published ONNX code (rtmlib averages them instead)."""
    locs = np.stack([simcc_x.argmax(axis=1), simcc_y.argmax(axis=1)], axis=1).astype(np.float32)
    scores = np.minimum(simcc_x.max(axis=1), simcc_y.max(axis=1))
    locs[scores <= 0] = -1  # no response at all: an unset keypoint, as mmpose marks it
    return locs / split, scores


def estimate(session: Any, bgr: Array, box: Array) -> tuple[Array, Array]:
    """The 133 whole-body keypoints (image pixels) and scores of the person in ``box``."""
    h, w = _input_hw(session, ESTIMATOR_INPUT)
    centre, ext, matrix = crop_transform(box, (h, w))
    crop = cv2.warpAffine(bgr, matrix, (w, h), flags=cv2.INTER_LINEAR)
    blob = np.ascontiguousarray(((crop.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)[None])
    outputs = _run(session, ESTIMATOR, blob)
    by_name = dict(zip([o.name for o in session.get_outputs()], outputs, strict=True))
    simcc_x, simcc_y = by_name.get("simcc_x", outputs[0]), by_name.get("simcc_y", outputs[-1])
    if simcc_x.ndim != 3 or simcc_y.ndim != 3 or simcc_x.shape[1] != KEYPOINTS or simcc_y.shape[1] != KEYPOINTS:
        shapes = f"{simcc_x.shape}, {simcc_y.shape}"
        raise JobError(f"{ESTIMATOR} does not look like DWPose's whole-body estimator: outputs {shapes}")
    points, scores = simcc_decode(simcc_x[0], simcc_y[0])
    return points / np.array([w, h], np.float32) * ext + centre - ext / 2, scores


def to_openpose(points: Array, scores: Array) -> Pose:
    """COCO-WholeBody keypoints (133) → OpenPose's body (with the neck), feet, face and hands."""
    neck = points[_SHOULDERS].mean(axis=0)
    # The neck's score is 1 when both shoulders are confident, else 0.
    neck_score = float((scores[_SHOULDERS] > THRESHOLD).all())
    all_points, all_scores = np.vstack([points, neck]), np.append(scores, neck_score)
    return Pose(
        body=all_points[_OPENPOSE_BODY],
        body_scores=all_scores[_OPENPOSE_BODY],
        feet=points[FEET],
        feet_scores=scores[FEET],
        face=points[FACE],
        face_scores=scores[FACE],
        hands=np.stack([points[LEFT_HAND], points[RIGHT_HAND]]),
        hand_scores=np.stack([scores[LEFT_HAND], scores[RIGHT_HAND]]),
    )


# -- drawing and glue ------------------------------------------------------------------------------------------


def draw(poses: Sequence[Pose], h: int, w: int) -> Array:
    """Bodies, hands and faces on black, with controlnet_aux's DWPose drawing (normalised coordinates, -1 = unset)."""
    util = aux("dwpose.util")
    canvas = np.zeros((h, w, 3), np.uint8)
    if not poses:
        return canvas
    size = np.array([w, h], np.float32)

    def shown(points: Array, scores: Array) -> Array:
        out = points / size
        out[scores < THRESHOLD] = -1
        return out

    candidate = np.concatenate([p.body / size for p in poses])
    subset = np.array([np.where(p.body_scores > THRESHOLD, 18 * i + np.arange(18), -1) for i, p in enumerate(poses)])
    canvas = util.draw_bodypose(canvas, candidate, subset)
    hands = [shown(hand, scores) for p in poses for hand, scores in zip(p.hands, p.hand_scores, strict=True)]
    canvas = util.draw_handpose(canvas, hands)
    canvas = util.draw_facepose(canvas, [shown(p.face, p.face_scores) for p in poses])
    return np.asarray(canvas, np.uint8)


def detect(img: Array, ctx: Context) -> list[Pose]:
    """Everyone DWPose finds on ``img`` (RGB)."""
    detector, estimator = (_session(ctx, ctx.annotator_dir / f) for f in FILES)
    bgr = np.ascontiguousarray(img[:, :, ::-1])  # both networks are fed OpenCV's BGR, as published
    return [to_openpose(*estimate(estimator, bgr, box)) for box in detect_people(detector, bgr)]


def dwpose(img: Array, ctx: Context) -> Array:
    """The DWPose map of ``img`` (RGB) at its size."""
    return draw(detect(img, ctx), *img.shape[:2])


def _input_hw(session: Any, default: tuple[int, int]) -> tuple[int, int]:
    dims = session.get_inputs()[0].shape[2:]
    static = len(dims) == 2 and all(isinstance(d, int) and d > 0 for d in dims)
    return (int(dims[0]), int(dims[1])) if static else default


def _run(session: Any, name: str, blob: Array) -> list[Array]:
    try:
        outputs: list[Array] = session.run(None, {session.get_inputs()[0].name: blob})
    except Exception as exc:  # a different model than DWPose's (input size, layout ...)
        raise JobError(f"annotator {name} failed to run: {exc}") from exc
    return outputs


def _session(ctx: Context, path: Path) -> Any:
    """An ONNX runtime session for ``path``, cached with the other annotator networks (keyed by mtime)."""

    def load() -> Any:
        import onnxruntime as ort
        import torch

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(torch.get_num_threads(), 1)  # the worker's CPU budget
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle spinning steals torch's cores
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # not an ONNX file, truncated download ...
            raise JobError(f"annotator weights {path.name} could not be loaded for dwpose: {exc!r}") from exc

    return ctx.nets.get("dwpose", path, "cpu", load)
