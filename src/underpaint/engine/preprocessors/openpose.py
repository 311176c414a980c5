"""OpenPose (``openpose``, ``openpose_hand``, ``openpose_face``, ``openpose_faceonly``, ``openpose_full``).

controlnet_aux's networks, estimators and body/face drawing around our loaded networks; our glue detects at the
output size and draws the hand skeleton itself (controlnet_aux's hand drawing needs matplotlib).
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from underpaint.engine.preprocessors.aux import aux
from underpaint.engine.preprocessors.context import Context
from underpaint.engine.preprocessors.networks import network
from underpaint.vocabulary import BODY_POSE_FILE as BODY
from underpaint.vocabulary import FACE_POSE_FILE as FACE
from underpaint.vocabulary import HAND_POSE_FILE as HAND

Array = np.ndarray

# The 21-keypoint hand skeleton: wrist to each finger's four joints.
_HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12)]
_HAND_EDGES += [(0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]


def _openpose_models(ctx: Context, hand: bool, face: bool) -> tuple[Any, Any, Any]:
    """Body, hand and face estimators (controlnet_aux classes around our loaded networks)."""
    body_mod, hand_mod, model_mod = aux("open_pose.body"), aux("open_pose.hand"), aux("open_pose.model")

    def wrap(cls: Any, net: Any) -> Any:
        # The estimator classes load weights in __init__ with their own torch.load; only .model is used after.
        est = object.__new__(cls)
        est.model = net
        return est

    d = ctx.annotator_dir
    body = wrap(body_mod.Body, network(ctx, "openpose_body", d / BODY, model_mod.bodypose_model, strip_prefix=True))
    hand_est = None
    if hand:
        hand_net = network(ctx, "openpose_hand", d / HAND, model_mod.handpose_model, strip_prefix=True)
        hand_est = wrap(hand_mod.Hand, hand_net)
    face_est = None
    if face:
        face_mod = aux("open_pose.face")
        face_est = wrap(face_mod.Face, network(ctx, "openpose_face", d / FACE, face_mod.FaceNet))
    return body, hand_est, face_est


def _draw_hand(canvas: Array, points: list[tuple[float, float]]) -> None:
    """Hand skeleton in the OpenPose colours (edge hue around the wheel, blue joints); points normalised, <0 unset."""
    h, w = canvas.shape[:2]
    px = [(int(x * w), int(y * h)) for x, y in points]
    for i, (a, b) in enumerate(_HAND_EDGES):
        if min(*px[a], *px[b]) > 0:
            rgb = colorsys.hsv_to_rgb(i / len(_HAND_EDGES), 1.0, 1.0)
            cv2.line(canvas, px[a], px[b], tuple(int(c * 255) for c in rgb), thickness=2)
    for x, y in px:
        if x > 0 and y > 0:
            cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)


def _local_peaks(peaks: Array, x0: int, y0: int, w: int, h: int) -> list[tuple[float, float]] | None:
    """Crop-relative peaks -> image-normalised points (``-1`` where the detector found nothing)."""
    if peaks.ndim != 2 or peaks.shape[1] != 2:
        return None
    return [(-1.0, -1.0) if px < 1e-6 or py < 1e-6 else ((px + x0) / w, (py + y0) / h) for px, py in peaks.tolist()]


def openpose_map(img: Array, ctx: Context, body: bool = True, hand: bool = False, face: bool = False) -> Array:
    """Detect people on ``img`` (RGB) and draw the requested parts on black, at the image's size."""
    util = aux("open_pose.util")
    keypoint = aux("open_pose.body").Keypoint
    body_est, hand_est, face_est = _openpose_models(ctx, hand, face)
    bgr = np.ascontiguousarray(img[:, :, ::-1])  # the networks were trained on OpenCV's BGR
    h, w = bgr.shape[:2]
    canvas = np.zeros((h, w, 3), np.uint8)
    candidate, subset = body_est(bgr)
    for person in body_est.format_body_result(candidate, subset):
        if body:
            points = [None if k is None else keypoint(x=k.x / w, y=k.y / h) for k in person.keypoints]
            canvas = util.draw_bodypose(canvas, points)
        if hand_est is not None:
            for x, y, size, _is_left in util.handDetect(person, bgr):
                found = _local_peaks(hand_est(bgr[y : y + size, x : x + size]).astype(np.float32), x, y, w, h)
                if found:
                    _draw_hand(canvas, found)
        if face_est is not None:
            box = util.faceDetect(person, bgr)
            if box is not None:
                x, y, size = box
                heatmaps = face_est(bgr[y : y + size, x : x + size])
                found = _local_peaks(face_est.compute_peaks_from_heatmaps(heatmaps).astype(np.float32), x, y, w, h)
                if found:
                    canvas = util.draw_facepose(canvas, [keypoint(x=px, y=py) for px, py in found])
    return canvas


def detector(body: bool, hand: bool, face: bool) -> Callable[[Array, Context], Array]:
    return lambda img, ctx: openpose_map(img, ctx, body=body, hand=hand, face=face)
