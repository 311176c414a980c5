"""ControlNet preprocessors: weight-free maps, network annotators from local weights, clear errors."""

from __future__ import annotations

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


def ctx(tmp: Path, seed: int = 1) -> P.Context:
    return P.Context(annotator_dir=tmp, seed=seed, device=torch.device("cpu"))


def test_every_seed_enum_name_is_known() -> None:
    for name in SEED_ENUM:
        assert name in P.PREPROCESSORS, name


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
    torch.save(P._aux("hed").ControlNetHED_Apache2().state_dict(), tmp_path / "ControlNetHED.pth")
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
    assert P.missing_files("lineart", tmp_path) == ["sk_model.pth", "sk_model2.pth"]


def test_unsupported_and_unknown_are_clear(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="'segmentation' has no implementation in this build"):
        P.check("segmentation", tmp_path)
    with pytest.raises(JobError, match="not supported"):
        P.check("no_such_preprocessor", tmp_path)


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


def _zero_openpose_weights(folder: Path) -> None:
    from underpaint.demo.controlnet import write_zero_annotator

    model = P._aux("open_pose.model")
    write_zero_annotator(model.bodypose_model, folder / P.BODY, prefix_depth=1)
    write_zero_annotator(model.handpose_model, folder / P.HAND, prefix_depth=1)
    write_zero_annotator(P._aux("open_pose.face").FaceNet, folder / P.FACE)


def test_openpose_family_runs_from_local_weights(tmp_path: Path) -> None:
    """Every OpenPose variant loads its files and runs detection end to end (zero nets find nobody: black map)."""
    _zero_openpose_weights(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    for name in ("openpose_full", "openpose_faceonly"):  # all three files; the body net runs (~3 s each)
        out = np.asarray(P.run_preprocessor(name, image, ctx(tmp_path)))
        assert out.shape == (96, 128, 3) and out.max() == 0, name


def test_openpose_glue_draws_detected_person(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a detected person, body drawing, hand crops and the face crop go through our glue."""
    _zero_openpose_weights(tmp_path)
    candidate = np.array([[x, y, 0.9, i] for i, (x, y) in enumerate(PERSON)], dtype=np.float64)
    subset = np.array([[*range(18), 16.0, 18.0]])
    body_cls, hand_cls, face_cls = (
        P._aux("open_pose.body").Body,
        P._aux("open_pose.hand").Hand,
        P._aux("open_pose.face").Face,
    )
    monkeypatch.setattr(body_cls, "__call__", lambda self, img: (candidate, subset))
    hand_crops: list[tuple[int, ...]] = []
    face_crops: list[tuple[int, ...]] = []

    def hand_call(self: object, crop: np.ndarray) -> np.ndarray:
        hand_crops.append(crop.shape)
        return np.array([[4.0 + i, 4.0 + i] for i in range(21)])  # a diagonal "hand" inside the crop

    real_face_call = face_cls.__call__

    def face_call(self: object, crop: np.ndarray) -> np.ndarray:
        face_crops.append(crop.shape)
        return real_face_call(self, crop)  # the zero FaceNet: heatmaps of the crop's size, no landmarks

    monkeypatch.setattr(hand_cls, "__call__", hand_call)
    monkeypatch.setattr(face_cls, "__call__", face_call)
    image = Image.new("RGB", (256, 256), (90, 90, 90))
    maps = {n: np.asarray(P.run_preprocessor(n, image, ctx(tmp_path))) for n in ("openpose", "openpose_hand")}
    assert maps["openpose"].max() > 0
    assert len(hand_crops) == 2
    assert (maps["openpose_hand"] != maps["openpose"]).any()  # the hands were drawn on top
    full = np.asarray(P.run_preprocessor("openpose_full", image, ctx(tmp_path)))
    # the face crop went through the zero FaceNet, which finds no landmarks: nothing more drawn
    assert np.array_equal(full, maps["openpose_hand"])
    assert len(face_crops) == 1


def test_openpose_needs_only_the_files_of_its_parts(tmp_path: Path) -> None:
    assert P.missing_files("openpose", tmp_path) == [P.BODY]
    assert P.missing_files("openpose_hand", tmp_path) == [P.BODY, P.HAND]
    assert P.missing_files("openpose_full", tmp_path) == [P.BODY, P.HAND, P.FACE]
    assert P.missing_files("openpose_faceonly", tmp_path) == [P.BODY, P.FACE]


def test_submit_check(tmp_path: Path) -> None:
    assert P.submit_check(None, tmp_path) is None
    assert P.submit_check("none", tmp_path) is None
    assert P.submit_check("canny", tmp_path) is None
    msg = P.submit_check("openpose_hand", tmp_path)
    assert msg is not None
    assert P.BODY in msg
    assert P.HAND in msg
    assert str(tmp_path) in msg
    assert "not supported" in (P.submit_check("bogus", tmp_path) or "")
    # accepted at submit (the seed's enum), the task then fails with the reason
    assert P.submit_check("clip_vision", tmp_path) is None
    assert "yolox_l.onnx" in (P.submit_check("dwpose", tmp_path) or "")
    assert P.MIDAS[0] in (P.submit_check("depth_midas", tmp_path) or "")
    (tmp_path / "ControlNetHED.pth").write_bytes(b"")
    assert P.submit_check("softedge_hed", tmp_path) is None


def test_broken_annotator_file_is_a_clear_error(picture: Image.Image, tmp_path: Path) -> None:
    (tmp_path / "table5_pidinet.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(JobError, match=r"table5_pidinet.pth could not be loaded"):
        P.run_preprocessor("softedge_pidinet", picture, ctx(tmp_path))


# -- depth and normal maps (MiDaS, Zoe, LeReS) -------------------------------------------------------------------


def write_published(build: Callable[[], torch.nn.Module], path: Path, layout: Callable[[StateDict], Any]) -> None:
    """A zero annotator file (a few KB for any network size) with its state dict arranged as ``layout`` says."""
    from underpaint.demo.controlnet import write_zero_annotator

    write_zero_annotator(build, path.with_name("flat.pth"))
    torch.save(layout(torch.load(path.with_name("flat.pth"), weights_only=True)), path)


def module_prefixed(state: StateDict) -> StateDict:
    return {"module." + k: v for k, v in state.items()}  # saved from DataParallel


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


def ramp(x: torch.Tensor, top: float = 1.0) -> torch.Tensor:
    """A prediction growing from 0 (left) to ``top`` (right), (1, H, W)."""
    return torch.linspace(0, top, x.shape[3]).expand(1, x.shape[2], x.shape[3])


def test_depth_leres_runs_from_a_published_layout_file(
    picture: Image.Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """res101.pth nests the weights under ``depth_model`` with DataParallel's ``module.`` prefix."""
    monkeypatch.setattr(P, "A1111_RESOLUTION", 64)  # the same path, a smaller network input
    write_published(P._leres_net, tmp_path / "res101.pth", lambda flat: {"depth_model": module_prefixed(flat)})
    out = np.asarray(P.run_preprocessor("depth_leres", picture, ctx(tmp_path)))
    assert out.shape == (96, 128, 3)
    assert (out == 255).all()


def test_depth_leres_maps_near_to_white(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = FakeNet(lambda x: ramp(x)[None])  # depth grows from left to right
    monkeypatch.setattr(P, "_net", lambda *a, **k: net)
    (tmp_path / "res101.pth").write_bytes(b"")  # present; the patched loader never reads it
    image = Image.new("RGB", (128, 64), (80, 80, 80))
    out = np.asarray(P.run_preprocessor("depth_leres", image, ctx(tmp_path)))[:, :, 0].astype(int)
    assert out[:, 0].min() >= 250
    assert out[:, -1].max() <= 5
    assert (np.diff(out[32]) <= 0).all()
    assert net.inputs[0].shape == (1, 3, 512, 1024)  # A1111's resolution: the short side at 512


@pytest.mark.slow
def test_depth_leres_boost_runs_from_published_layout_files(
    picture: Image.Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """depth_leres++: res101.pth plus the merge network's latest_net_G.pth (a plain state dict)."""
    # Smaller than A1111's, but not below what controlnet_aux's boosting handles (its resolution search needs
    # 3x the long side to exceed LeReS's receptive field of 448).
    monkeypatch.setattr(P, "A1111_RESOLUTION", 192)
    write_published(P._leres_net, tmp_path / "res101.pth", lambda flat: {"depth_model": module_prefixed(flat)})
    write_published(P._merge_net, tmp_path / "latest_net_G.pth", lambda flat: flat)
    out = np.asarray(P.run_preprocessor("depth_leres++", picture, ctx(tmp_path)))
    assert out.shape == (96, 128, 3)
    assert out.dtype == np.uint8
    assert {key[0] for key in P._nets} >= {"leres", "leres_merge"}


@pytest.mark.slow  # boosting blurs a 3000 x 3000 blending mask on every call
def test_depth_leres_boost_merges_through_the_merge_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both depth estimates go into the merge network (as its 2 input channels); its output is the map."""
    depth = FakeNet(lambda x: ramp(x)[None])
    merge = FakeNet(lambda pair: pair[:, 1:])  # passes the high-resolution estimate through
    monkeypatch.setattr(P, "_net", lambda kind, *a, **k: merge if kind == "leres_merge" else depth)
    for name in P.LERES_BOOST:
        (tmp_path / name).write_bytes(b"")
    image = Image.new("RGB", (128, 64), (80, 80, 80))
    out = np.asarray(P.run_preprocessor("depth_leres++", image, ctx(tmp_path)))[:, :, 0].astype(int)
    assert len(merge.inputs) == 1
    assert merge.inputs[0].shape == (1, 2, 1024, 1024)
    # LeReS at its receptive field, then at the resolution boosting picks (a flat image: the largest, 49 x 32)
    assert [tuple(x.shape[2:]) for x in depth.inputs] == [(448, 448), (1568, 1568)]
    assert out[:, 0].min() >= 250
    assert out[:, -1].max() <= 5
    assert (np.diff(out[32]) <= 0).all()


# A zero network predicts a flat depth, which controlnet_aux's min-max normalisation turns into 0 / 0.
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_midas_depth_and_normal_map_run_from_the_published_file(
    picture: Image.Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dpt_hybrid-midas-501f0c75.pt is a plain state dict (MiDaS v3's release file)."""
    monkeypatch.setattr(P, "A1111_RESOLUTION", 64)
    write_published(P._midas_net, tmp_path / P.MIDAS[0], lambda flat: flat)
    for name in ("depth", "depth_midas"):
        out = np.asarray(P.run_preprocessor(name, picture, ctx(tmp_path)))
        assert out.shape == (96, 128, 3) and out.dtype == np.uint8, name
    normal = np.asarray(P.run_preprocessor("normal_map", picture, ctx(tmp_path)))
    # a flat (zero) depth faces the camera everywhere: z up, as the blue-first normal map shows it (R = z)
    assert normal.shape == (96, 128, 3)
    assert (normal == (255, 127, 127)).all()


def test_midas_maps_near_to_white(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = FakeNet(ramp)  # MiDaS predicts inverse depth: here nearer to the right
    monkeypatch.setattr(P, "_net", lambda *a, **k: net)
    (tmp_path / P.MIDAS[0]).write_bytes(b"")
    out = np.asarray(P.run_preprocessor("depth", Image.new("RGB", (128, 64), (80, 80, 80)), ctx(tmp_path)))
    gray = out[:, :, 0].astype(int)
    assert gray[:, 0].max() <= 5
    assert gray[:, -1].min() >= 250
    assert (np.diff(gray[32]) >= 0).all()
    x = net.inputs[0]
    assert x.shape == (1, 3, 512, 1024)
    assert float(x.min()) >= -1
    assert float(x.max()) <= 1
    assert float(x[0, 0, 0, 0]) == pytest.approx(80 / 127.5 - 1, abs=0.01)


def test_normal_map_leaves_the_background_flat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111's background threshold 0.4: where the depth is below 40% of its range the normal faces the camera;
    elsewhere the slope of the depth tilts it (x goes to the blue channel)."""
    monkeypatch.setattr(P, "_net", lambda *a, **k: FakeNet(lambda x: ramp(x, top=4 * x.shape[3])))
    (tmp_path / P.MIDAS[0]).write_bytes(b"")
    out = np.asarray(P.run_preprocessor("normal_map", Image.new("RGB", (100, 64), (80, 80, 80)), ctx(tmp_path)))
    row = out[32].astype(int)
    assert (row[5:35] == (255, 127, 127)).all()  # background: flat
    assert (row[45:95, 2] >= 245).all()
    assert (abs(row[45:95, 1] - 127) <= 1).all()


@pytest.mark.slow
def test_zoe_runs_from_the_published_file(picture: Image.Image, tmp_path: Path) -> None:
    """ZoeD_M12_N.pt nests the weights under ``model``; written by an older timm, it also holds BEiT's
    relative_position_index buffers, which timm 1.x computes instead of loading (~20 s: BEiT-L at 384x512, x2)."""
    with torch.device("meta"):
        indices = {k: v for k, v in P._zoe_net().named_buffers() if k.endswith("relative_position_index")}
    assert len(indices) == 24  # one per BEiT-L block

    def layout(flat: StateDict) -> dict[str, StateDict]:
        return {"model": flat | {k: torch.zeros((), dtype=torch.int64).expand(v.shape) for k, v in indices.items()}}

    write_published(P._zoe_net, tmp_path / P.ZOE[0], layout)
    out = np.asarray(P.run_preprocessor("depth_zoe", picture, ctx(tmp_path)))
    assert out.shape == (96, 128, 3)
    assert out.dtype == np.uint8


def test_zoe_maps_near_to_white(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = FakeNet(lambda x: ramp(x)[None])  # Zoe predicts metric depth: here farther to the right
    monkeypatch.setattr(P, "_net", lambda *a, **k: net)
    (tmp_path / P.ZOE[0]).write_bytes(b"")
    out = np.asarray(P.run_preprocessor("depth_zoe", Image.new("RGB", (128, 64), (80, 80, 80)), ctx(tmp_path)))
    gray = out[:, :, 0].astype(int)
    # normalised between the 2nd and 85th percentiles: the nearest columns white, the farthest 15% black
    assert gray[:, 0].min() >= 250
    assert (gray[:, -15:] == 0).all()
    assert (np.diff(gray[32]) <= 0).all()
    x = net.inputs[0]
    assert x.shape == (1, 3, 512, 1024)
    assert float(x[0, 0, 0, 0]) == pytest.approx(80 / 255, abs=0.01)


def test_depth_files_are_named_when_missing(picture: Image.Image, tmp_path: Path) -> None:
    cases = [("depth", P.MIDAS), ("normal_map", P.MIDAS), ("depth_zoe", P.ZOE), ("depth_leres++", P.LERES_BOOST)]
    for name, files in cases:
        with pytest.raises(JobError) as err:
            P.run_preprocessor(name, picture, ctx(tmp_path))
        assert all(f in str(err.value) for f in files) and str(tmp_path) in str(err.value), name
    (tmp_path / "res101.pth").write_bytes(b"")
    assert P.missing_files("depth_leres++", tmp_path) == ["latest_net_G.pth"]
    assert P.missing_files("depth_leres", tmp_path) == []


def test_normal_bae_runs_from_a_published_layout_file(picture: Image.Image, tmp_path: Path) -> None:
    """scannet.pt nests the weights under ``model`` with DataParallel's ``module.`` prefix."""
    from underpaint.demo.controlnet import write_zero_annotator

    write_zero_annotator(P._normal_bae_net, tmp_path / "flat.pth")
    flat = torch.load(tmp_path / "flat.pth", weights_only=True)
    torch.save({"model": {"module." + k: v for k, v in flat.items()}}, tmp_path / "scannet.pt")
    out = np.asarray(P.run_preprocessor("normal_bae", picture, ctx(tmp_path)))
    # a zero network predicts the zero vector, which the normal map shows as mid-grey
    assert out.shape == (96, 128, 3)
    assert (out == 127).all()


def test_controlnet_aux_top_level_init_is_never_run(tmp_path: Path) -> None:
    """Its __init__ imports every detector; segment_anything's import overwrites entries of timm's registry."""
    import sys

    P._aux("hed")
    P._aux("zoe")
    assert "controlnet_aux.segment_anything" not in sys.modules
