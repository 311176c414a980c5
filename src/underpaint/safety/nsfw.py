"""NSFW detection for generated images (``extra.enable_nsfw_detection`` / ``extra.nsfw_detection_level``).

The detector is nudenet 3.4's bundled ``320n.onnx``, an object detector for 18 body-part classes, run on
onnxruntime's CPU provider with one intra-op thread. It needs no network and no GPU, so the worker can run it
after decoding while the accelerator already works on the next task.

Novita describes three cumulative levels. nudenet has no overall NSFW score, so each level is a set of
nudenet classes, and an image's ``confidence`` (0..100) is the highest detection score among the classes
counted at the requested level, times 100 (0 when none of them is detected; nudenet drops boxes scoring
below 0.2, so a non-zero confidence is always >= 20):

=====  ==============================================  ===============================================
level  Novita's wording (cumulative)                   nudenet classes counted (cumulative)
=====  ==============================================  ===============================================
0      explicit nudity, explicit sexual activity,      FEMALE_GENITALIA_EXPOSED, MALE_GENITALIA_EXPOSED,
       sex toys, hate symbols                          FEMALE_BREAST_EXPOSED, BUTTOCKS_EXPOSED,
                                                       ANUS_EXPOSED
1      + non-explicit nudity, obstructed intimate      + MALE_BREAST_EXPOSED (bare chest),
       parts, kissing on the lips                      FEMALE_GENITALIA_COVERED, ANUS_COVERED
                                                       (intimate parts covered by hands, cloth, objects)
2      + female / male swimwear or underwear           + FEMALE_BREAST_COVERED, BUTTOCKS_COVERED,
                                                       BELLY_EXPOSED (proxies for swimwear/underwear)
=====  ==============================================  ===============================================

Faces, feet and armpits are never counted. This is a best effort, not Novita's classifier. nudenet cannot
see hate symbols, sex toys, kissing, or sexual activity as such (only the body parts visible in it).
"Covered" cannot tell underwear from a hand or a shirt, so levels 1 and 2 also flag some clothed people.
See docs/nsfw.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from underpaint.tasks.types import NsfwResult

log = logging.getLogger(__name__)

EXPLICIT_CLASSES = frozenset(
    {
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)
NON_EXPLICIT_CLASSES = frozenset({"MALE_BREAST_EXPOSED", "FEMALE_GENITALIA_COVERED", "ANUS_COVERED"})
SWIMWEAR_CLASSES = frozenset({"FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED", "BELLY_EXPOSED"})

LEVEL_CLASSES: dict[int, frozenset[str]] = {
    0: EXPLICIT_CLASSES,
    1: EXPLICIT_CLASSES | NON_EXPLICIT_CLASSES,
    2: EXPLICIT_CLASSES | NON_EXPLICIT_CLASSES | SWIMWEAR_CLASSES,
}

# nudenet's model input side; its boxes are computed on a letterboxed square of this size.
_INPUT_SIZE = 320


def classes_for_level(level: int) -> frozenset[str]:
    if isinstance(level, bool) or level not in LEVEL_CLASSES:
        raise ValueError(f"nsfw_detection_level must be 0, 1 or 2, got {level!r}")
    return LEVEL_CLASSES[level]


def score_detections(detections: Iterable[Mapping[str, Any]], level: int) -> float:
    """Confidence 0..100 that an image is NSFW at ``level``, from nudenet detections ``{class, score, ...}``."""
    counted = classes_for_level(level)
    best = max((float(d["score"]) for d in detections if d.get("class") in counted), default=0.0)
    return round(min(max(best, 0.0), 1.0) * 100.0, 2)


def default_model_path() -> Path:
    import nudenet

    return Path(nudenet.__file__).with_name("320n.onnx")


class NsfwDetector:
    """Thread-safe, lazily loaded nudenet detector.

    ``detect`` takes ~15-50 ms per image on one CPU core. It may be called from any thread, concurrently
    (onnxruntime sessions allow concurrent ``run`` calls); the worker calls it on a side thread so that
    generation of the next task is not held up.
    """

    def __init__(self, model_path: Path | None = None, threads: int = 1) -> None:
        self._model_path = model_path
        self._threads = threads
        self._lock = threading.Lock()
        self._session: Any = None
        self._input_name = ""

    def _get_session(self) -> Any:
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self._threads
                opts.inter_op_num_threads = 1
                # Idle onnxruntime threads spin by default, which steals cores from torch.
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                path = self._model_path or default_model_path()
                start = time.perf_counter()
                session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
                seconds = time.perf_counter() - start
                # The operator's INFO line per model load, as engine.lru.logged_load writes it for the others.
                log.info(
                    "NSFW detector %s loaded in %.2f s (tier disk)", path.name, seconds,
                    extra={"model_kind": "NSFW detector", "model": path.name, "load_seconds": round(seconds, 3),
                           "tier": "disk"},
                )  # fmt: skip
                self._input_name = session.get_inputs()[0].name
                self._session = session
            return self._session

    def raw_detections(self, image: Image.Image) -> list[dict[str, Any]]:
        """nudenet's detections for one image: ``[{"class", "score", "box"}]``, as ``NudeDetector.detect``."""
        # nudenet's own pre/post-processing (letterbox, NMS) keeps results identical to NudeDetector.detect,
        # which cannot take session options (thread count) itself.
        from nudenet import nudenet as nn

        session = self._get_session()
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # nudenet expects cv2's BGR
        blob, x_ratio, y_ratio, x_pad, y_pad, width, height = nn._read_image(bgr, _INPUT_SIZE)
        outputs = session.run(None, {self._input_name: blob})
        detections: list[dict[str, Any]] = nn._postprocess(
            outputs, x_pad, y_pad, x_ratio, y_ratio, width, height, _INPUT_SIZE, _INPUT_SIZE
        )
        return detections

    def detect(self, images: Sequence[Image.Image], level: int) -> list[NsfwResult]:
        """One result per image, in order. ``valid=False`` (confidence 0) only where detection itself failed."""
        classes_for_level(level)
        results: list[NsfwResult] = []
        for index, image in enumerate(images):
            try:
                confidence = score_detections(self.raw_detections(image), level)
            except Exception:
                log.exception("NSFW detection failed for image %d", index)
                results.append(NsfwResult(valid=False, confidence=0.0))
            else:
                results.append(NsfwResult(valid=True, confidence=confidence))
        return results

    def close(self) -> None:
        """Release the ONNX session; the next call loads it again."""
        with self._lock:
            self._session = None
