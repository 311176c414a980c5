"""NSFW level mapping on detector outputs, and real runs of nudenet's bundled model (offline, CPU)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from tests.support.logs import assert_load_lines

from underpaint.safety.nsfw import LEVEL_CLASSES, NsfwDetector, classes_for_level, score_detections
from underpaint.tasks.types import NsfwResult

NUDENET_CLASSES = {
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
}  # fmt: skip


def det(cls: str, score: float) -> dict[str, Any]:
    return {"class": cls, "score": score, "box": [0, 0, 10, 10]}


# (class, lowest level at which it counts; None = never)
MAPPING = [
    ("FEMALE_GENITALIA_EXPOSED", 0),
    ("MALE_GENITALIA_EXPOSED", 0),
    ("FEMALE_BREAST_EXPOSED", 0),
    ("BUTTOCKS_EXPOSED", 0),
    ("ANUS_EXPOSED", 0),
    ("MALE_BREAST_EXPOSED", 1),
    ("FEMALE_GENITALIA_COVERED", 1),
    ("ANUS_COVERED", 1),
    ("FEMALE_BREAST_COVERED", 2),
    ("BUTTOCKS_COVERED", 2),
    ("BELLY_EXPOSED", 2),
    ("FACE_FEMALE", None),
    ("FACE_MALE", None),
    ("FEET_EXPOSED", None),
    ("FEET_COVERED", None),
    ("ARMPITS_EXPOSED", None),
    ("ARMPITS_COVERED", None),
    ("BELLY_COVERED", None),
]


def test_mapping_covers_every_nudenet_class_and_only_those() -> None:
    assert {cls for cls, _ in MAPPING} == NUDENET_CLASSES
    assert LEVEL_CLASSES[2] <= NUDENET_CLASSES
    assert LEVEL_CLASSES[0] < LEVEL_CLASSES[1] < LEVEL_CLASSES[2]  # levels are cumulative


@pytest.mark.parametrize(("cls", "first_level"), MAPPING)
def test_single_detection_counts_from_its_level_on(cls: str, first_level: int | None) -> None:
    for level in (0, 1, 2):
        counted = first_level is not None and level >= first_level
        assert score_detections([det(cls, 0.83)], level) == (83.0 if counted else 0.0), (cls, level)


def test_confidence_is_the_max_over_counted_classes() -> None:
    detections = [
        det("FACE_FEMALE", 0.97),  # never counted, even though highest
        det("BELLY_EXPOSED", 0.91),  # level 2 only
        det("MALE_BREAST_EXPOSED", 0.6),  # level 1+
        det("BUTTOCKS_EXPOSED", 0.35),  # level 0+
        det("BUTTOCKS_EXPOSED", 0.512345),
    ]
    assert score_detections(detections, 0) == 51.23
    assert score_detections(detections, 1) == 60.0
    assert score_detections(detections, 2) == 91.0
    assert score_detections([], 2) == 0.0
    assert score_detections([det("ANUS_EXPOSED", 1.0000001)], 0) == 100.0


@pytest.mark.parametrize("level", [-1, 3, "1", True, None])
def test_bad_level_is_rejected(level: Any) -> None:
    with pytest.raises(ValueError, match="nsfw_detection_level"):
        classes_for_level(level)
    with pytest.raises(ValueError, match="nsfw_detection_level"):
        NsfwDetector().detect([], level)


def _gradient(size: int = 256) -> Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack(
        [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 90, np.uint8)], -1
    )
    return Image.fromarray(rgb)


def _noise(size: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def detector() -> Any:
    d = NsfwDetector()
    yield d
    d.close()


def test_real_model_on_synthetic_images(detector: NsfwDetector) -> None:
    images = [_gradient(), _noise(256, 1), _noise(128, 2).convert("L"), Image.new("RGBA", (300, 200), (0, 0, 0, 0))]
    for level in (0, 1, 2):
        results = detector.detect(images, level)
        assert len(results) == len(images)
        for r in results:
            assert isinstance(r, NsfwResult)
            assert r.valid
            assert 0.0 <= r.confidence < 20.0  # nothing body-like; nudenet reports nothing under 0.2
    raw = detector.raw_detections(_noise(256, 3))
    assert isinstance(raw, list)
    assert all(set(d) == {"class", "score", "box"} and d["class"] in NUDENET_CLASSES for d in raw)


def test_the_detector_load_gets_its_info_line_once(caplog: pytest.LogCaptureFixture) -> None:
    d = NsfwDetector()
    try:
        with caplog.at_level(logging.INFO, logger="underpaint.safety"):
            d.detect([_gradient()], 1)
            d.detect([_gradient()], 2)  # loaded: no second line
    finally:
        d.close()
    assert_load_lines(caplog, "NSFW detector", ["320n.onnx"], tiers=["disk"])


def _crude_nude_torso(blur: int = 4) -> Image.Image:
    """A skin-toned torso with two breasts and nipples, drawn with ellipses: enough for nudenet."""
    image = Image.new("RGB", (320, 320), (40, 40, 60))
    draw = ImageDraw.Draw(image)
    draw.rectangle([40, 0, 280, 320], fill=(210, 160, 130))
    for cx in (110, 210):
        draw.ellipse([cx - 60, 90, cx + 60, 210], fill=(190, 140, 110))
        draw.ellipse([cx - 8, 157, cx + 8, 173], fill=(150, 80, 80))
    return image.filter(ImageFilter.GaussianBlur(blur))


def test_real_model_flags_exposed_breasts_at_every_level(detector: NsfwDetector) -> None:
    image = _crude_nude_torso()
    raw = detector.raw_detections(image)
    assert "FEMALE_BREAST_EXPOSED" in {d["class"] for d in raw}
    results = [detector.detect([image], level)[0] for level in (0, 1, 2)]
    assert all(r.valid for r in results)
    assert results[0].confidence >= 50.0  # explicit nudity counts at level 0 already
    assert results[0].confidence <= results[1].confidence <= results[2].confidence
    assert results[0].confidence == score_detections(raw, 0)


def test_real_model_matches_nudenet_reference(detector: NsfwDetector) -> None:
    """Our single-thread session must see what nudenet's own NudeDetector sees on the same pixels."""
    from nudenet import NudeDetector

    image = _crude_nude_torso(blur=2)
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    ours, theirs = detector.raw_detections(image), NudeDetector().detect(bgr)
    assert ours
    assert [(d["class"], d["box"]) for d in ours] == [(d["class"], d["box"]) for d in theirs]
    assert [d["score"] for d in ours] == pytest.approx([d["score"] for d in theirs], abs=1e-4)


def test_failed_detection_is_reported_per_image(detector: NsfwDetector) -> None:
    broken = Image.new("RGB", (0, 0))  # cv2 cannot letterbox an empty image
    results = detector.detect([_gradient(64), broken], 0)
    assert results[0].valid is True
    assert results[1] == NsfwResult(valid=False, confidence=0.0)


def test_missing_model_file_marks_results_invalid(tmp_path: Any) -> None:
    results = NsfwDetector(model_path=tmp_path / "absent.onnx").detect([_gradient(64)], 1)
    assert results == [NsfwResult(valid=False, confidence=0.0)]


def test_concurrent_use(detector: NsfwDetector) -> None:
    images = [_gradient(128), _crude_nude_torso()]
    expected = detector.detect(images, 2)
    assert expected[1].confidence > 0
    outputs: list[list[NsfwResult]] = []
    threads = [threading.Thread(target=lambda: outputs.append(detector.detect(images, 2))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outputs == [expected] * 3
