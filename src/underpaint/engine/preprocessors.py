"""ControlNet preprocessors ("annotators"): turn a unit's image into the control map its ControlNet expects.

Every name the Novita docs/JS SDK and the Python SDK send is known here. Four groups:

* weight-free, work out of the box: ``canny``, ``shuffle`` and the Python SDK's ``invert``, ``threshold``,
  ``color``, ``scribble_xdog``, ``tile_resample``, ``binary``;
* network annotators whose weights the operator drops into ``M/annotator/`` (file names as published with
  lllyasviel's ControlNet annotators): HED, PiDiNet, MLSD, lineart, lineart_anime, MiDaS depth and normal_map
  (``dpt_hybrid-midas-501f0c75.pt``), Zoe depth (``ZoeD_M12_N.pt``), LeReS depth (``res101.pth``, plus
  ``latest_net_G.pth`` for boosting), NormalBae (``scannet.pt``) and OpenPose (body, hands, face:
  ``body_pose_model.pth``, ``hand_pose_model.pth``, ``facenet.pth``). The network definitions, the detectors' pre-
  and postprocessing and OpenPose's body/face drawing come from the ``controlnet_aux`` package (its top-level
  ``__init__`` is never run); weights load with ``torch.load(weights_only=True)``, strictly;
* DWPose (``yolox_l.onnx``, ``dw-ll_ucoco_384.onnx`` on onnxruntime) and the MediaPipe face mesh (models inside the
  mediapipe wheel): ``underpaint.engine.annotators``;
* annotators that controlnet_aux does not have (segmentation, oneformer, clip_vision). They are accepted by the
  API and fail the task with a reason saying so; pass a ready-made map with preprocessor ``none`` instead.

``none`` (or no preprocessor) uses the image as the control map.
"""

from __future__ import annotations

import colorsys
import contextlib
import importlib
import io
import os
import sys
import sysconfig
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from underpaint.engine.annotators import dwpose, mediapipe_face
from underpaint.engine.job import JobError

Array = np.ndarray


@dataclass(frozen=True)
class Context:
    annotator_dir: Path
    seed: int
    device: torch.device


@dataclass(frozen=True)
class Preprocessor:
    name: str
    run: Callable[[Array, Context], Array] | None
    files: tuple[str, ...] = ()
    unsupported: str | None = None


# -- weight-free ---------------------------------------------------------------------------------------


def _gray3(x: Array) -> Array:
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x


def canny(img: Array, ctx: Context) -> Array:
    # A1111's defaults: low 100, high 200.
    return _gray3(cv2.Canny(img, 100, 200))


def shuffle(img: Array, ctx: Context) -> Array:
    """Content shuffle: warp the image by a smooth random flow field, seeded by the task seed."""
    h, w = img.shape[:2]
    rng = np.random.default_rng(ctx.seed)

    def field(size: int) -> Array:
        coarse = rng.random((max(h // 64, 2), max(w // 64, 2))).astype(np.float32)
        return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) * size

    xs = np.clip(field(w), 0, w - 1).astype(np.float32)
    ys = np.clip(field(h), 0, h - 1).astype(np.float32)
    return cv2.remap(img, xs, ys, interpolation=cv2.INTER_LINEAR)


def invert(img: Array, ctx: Context) -> Array:
    return 255 - img


def threshold(img: Array, ctx: Context) -> Array:
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return _gray3(np.where(gray > 127, 255, 0).astype(np.uint8))


def binary(img: Array, ctx: Context) -> Array:
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    _, out = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return _gray3(out)


def color(img: Array, ctx: Context) -> Array:
    # A1111 "color": a 64x downscale mosaic of the colours.
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(w // 64, 1), max(h // 64, 1)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def scribble_xdog(img: Array, ctx: Context) -> Array:
    # Difference of Gaussians: white lines on black where 2 * (255 - dog) exceeds A1111's threshold 32.
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    return _gray3(np.where(2 * (255 - dog.astype(np.int32)) > 32, 255, 0).astype(np.uint8))


def tile_resample(img: Array, ctx: Context) -> Array:
    return img


# -- network annotators (controlnet_aux definitions, our weight loading) -----------------------------------


_AUX_ROOT = os.path.join(sysconfig.get_paths()["purelib"], "controlnet_aux")
_import_lock = threading.Lock()


def _aux(module: str) -> Any:
    """Import a controlnet_aux submodule. The top-level package is registered as a bare namespace first: its
    ``__init__`` imports every detector (mediapipe and mmpose probes, and segment_anything, which overwrites timm's
    registry entries)."""
    with _import_lock:
        if "controlnet_aux" not in sys.modules:
            pkg = types.ModuleType("controlnet_aux")
            pkg.__path__ = [_AUX_ROOT]
            sys.modules["controlnet_aux"] = pkg
    return importlib.import_module(f"controlnet_aux.{module}")


# Loaded annotator networks, least recently used dropped beyond the limit (most are 0.1-0.5 GB, Zoe 1.4 GB).
_NETS_LIMIT = 4
_nets: OrderedDict[tuple[str, Path, float, str], Any] = OrderedDict()
_nets_lock = threading.Lock()


def _load_state(path: Path, nested: str | None = None) -> dict[str, torch.Tensor]:
    """A plain state dict from an annotator file: un-nested (``state_dict`` or ``nested``), DataParallel's
    leading ``module.`` dropped."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", nested):
        if key and isinstance(state, dict) and key in state:
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _cached(key: tuple[str, Path, float, str], build: Callable[[], Any]) -> Any:
    with _nets_lock:
        if key not in _nets:
            _nets[key] = build()
            while len(_nets) > _NETS_LIMIT:
                _nets.popitem(last=False)
        _nets.move_to_end(key)
        return _nets[key]


def _net(
    kind: str,
    path: Path,
    device: torch.device,
    build: Callable[[], torch.nn.Module],
    strip_prefix: bool = False,
    nested: str | None = None,
) -> Any:
    """``build()`` with the weights of ``path``, on ``device``; ``strip_prefix``: the file's names lack the first
    module level (the OpenPose files: ``conv1_1.weight`` for the network's ``model0.conv1_1.weight``); ``nested``:
    the state dict sits under that key (LeReS: ``depth_model``, Zoe: ``model``)."""

    def load() -> Any:
        net = build()
        try:
            state = _load_state(path, nested)
            if strip_prefix:
                state = {k: state[k.split(".", 1)[1]] for k in net.state_dict()}
            # Buffers the network computes at build and no longer saves (timm's BEiT relative_position_index,
            # which the older timm the Zoe file was written with did save) come from the build, not the file.
            transient = {name for name, _ in net.named_buffers()} - net.state_dict().keys()
            state = {k: v for k, v in state.items() if k not in transient}
            # Strict whatever the class overrides: ZoeDepth's own load_state_dict is non-strict under timm 1.x.
            torch.nn.Module.load_state_dict(net, state)
        except Exception as exc:  # wrong file, truncated download ...
            raise JobError(f"annotator weights {path.name} could not be loaded for {kind}: {exc!r}") from exc
        return net.float().eval().to(device)

    try:
        mtime = path.stat().st_mtime  # in the key: a replaced file is loaded afresh
    except OSError as exc:
        raise JobError(f"annotator weights {path.name} are gone from {path.parent}: {exc}") from exc
    return _cached((kind, path, mtime, str(device)), load)


def _detector(kind: str, files: tuple[str, ...], ctx: Context) -> Any:
    paths = [ctx.annotator_dir / f for f in files]
    if kind == "midas":
        return _aux("midas").MidasDetector(_net(kind, paths[0], ctx.device, _midas_net))
    if kind == "zoe":
        return _aux("zoe").ZoeDetector(_net(kind, paths[0], ctx.device, _zoe_net, nested="model"))
    if kind == "leres":
        depth = _net(kind, paths[0], ctx.device, _leres_net, nested="depth_model")
        merge = _merge_model(_net("leres_merge", paths[1], ctx.device, _merge_net), ctx.device) if paths[1:] else None
        return _aux("leres").LeresDetector(depth, merge)
    if kind == "hed":
        m = _aux("hed")
        return m.HEDdetector(_net(kind, paths[0], ctx.device, m.ControlNetHED_Apache2))
    if kind == "pidinet":
        m = _aux("pidi")
        return m.PidiNetDetector(_net(kind, paths[0], ctx.device, _aux("pidi.model").pidinet))
    if kind == "mlsd":
        m = _aux("mlsd")
        return m.MLSDdetector(_net(kind, paths[0], ctx.device, _aux("mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large))
    if kind == "lineart":
        m = _aux("lineart")
        return m.LineartDetector(
            _net(kind, paths[0], ctx.device, lambda: m.Generator(3, 1, 3)),
            _net(kind + "_coarse", paths[1], ctx.device, lambda: m.Generator(3, 1, 3)),
        )
    if kind == "lineart_anime":
        import functools

        m = _aux("lineart_anime")
        norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
        return m.LineartAnimeDetector(
            _net(kind, paths[0], ctx.device, lambda: m.UnetGenerator(3, 1, 8, 64, norm_layer=norm))
        )
    raise AssertionError(kind)


def _network(
    kind: str, files: tuple[str, ...], a1111_res: bool = False, **call_kwargs: Any
) -> Callable[[Array, Context], Array]:
    """Run controlnet_aux's detector for ``kind`` on our loaded networks. It detects with the short side at
    ``A1111_RESOLUTION`` (``a1111_res``) or at the output's; run_preprocessor resizes the map to the output size."""

    def run(img: Array, ctx: Context) -> Array:
        detector = _detector(kind, files, ctx)
        res = A1111_RESOLUTION if a1111_res else min(img.shape[:2])
        with _boosting() if call_kwargs.get("boost") else contextlib.nullcontext():
            out = detector(img, detect_resolution=res, image_resolution=res, output_type="np", **call_kwargs)
        if isinstance(out, tuple):  # MiDaS with depth_and_normal: (depth, normal)
            out = out[1]
        return _gray3(np.asarray(out))

    return run


# -- OpenPose (controlnet_aux's networks, detectors and drawing; our glue) ------------------------------------

BODY, HAND, FACE = "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"
# The 21-keypoint hand skeleton: wrist to each finger's four joints.
_HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12)]
_HAND_EDGES += [(0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]


def _openpose_models(ctx: Context, hand: bool, face: bool) -> tuple[Any, Any, Any]:
    """Body, hand and face estimators (controlnet_aux classes around our loaded networks)."""
    body_mod, hand_mod, model_mod = _aux("open_pose.body"), _aux("open_pose.hand"), _aux("open_pose.model")

    def wrap(cls: Any, net: Any) -> Any:
        # The estimator classes load weights in __init__ with their own torch.load; only .model is used after.
        est = object.__new__(cls)
        est.model = net
        return est

    d = ctx.annotator_dir
    body = wrap(body_mod.Body, _net("openpose_body", d / BODY, ctx.device, model_mod.bodypose_model, strip_prefix=True))
    hand_est = None
    if hand:
        hand_est = wrap(
            hand_mod.Hand, _net("openpose_hand", d / HAND, ctx.device, model_mod.handpose_model, strip_prefix=True)
        )
    face_est = None
    if face:
        face_mod = _aux("open_pose.face")
        face_est = wrap(face_mod.Face, _net("openpose_face", d / FACE, ctx.device, face_mod.FaceNet))
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
    util = _aux("open_pose.util")
    keypoint = _aux("open_pose.body").Keypoint
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


def _openpose(body: bool, hand: bool, face: bool) -> Callable[[Array, Context], Array]:
    return lambda img, ctx: openpose_map(img, ctx, body=body, hand=hand, face=face)


# -- depth: MiDaS, Zoe, LeReS (controlnet_aux's networks and detectors; our weight loading) --------------------

# A1111's preprocessor resolution when the request sets none (its API's default processor_res); the depth family
# detects at it (their networks were trained around this size), the other annotators at the output size.
A1111_RESOLUTION = 512
# A1111's default "Normal Background Threshold" of normal_map: normals flattened where depth < 40% of its range.
NORMAL_MAP_BACKGROUND = 0.4
MIDAS = ("dpt_hybrid-midas-501f0c75.pt",)
ZOE = ("ZoeD_M12_N.pt",)
LERES = ("res101.pth",)
LERES_BOOST = ("res101.pth", "latest_net_G.pth")
_boost_lock = threading.Lock()


def _midas_net() -> torch.nn.Module:
    # MiDaS v3 DPT-Hybrid, as controlnet_aux's MiDaSInference("dpt_hybrid") builds it; path=None: no download.
    dpt = _aux("midas.midas.dpt_depth").DPTDepthModel
    net: torch.nn.Module = dpt(path=None, backbone="vitb_rn50_384", non_negative=True)
    return net


def _zoe_net() -> torch.nn.Module:
    # ZoeD_M12_N: ZoeDepth on a MiDaS BEiT-L core, built from the bundled MiDaS repo (torch.hub source="local")
    # with use_pretrained_midas=False in the "infer" config: nothing is downloaded.
    config = _aux("zoe.zoedepth.utils.config").get_config("zoedepth", "infer")
    net: torch.nn.Module = _aux("zoe").ZoeDepth.build_from_config(config)
    return net


def _leres_net() -> torch.nn.Module:
    net: torch.nn.Module = _aux("leres.leres.multi_depth_model_woauxi").RelDepthModel(backbone="resnext101")
    return net


def _merge_net() -> torch.nn.Module:
    """The boosting merge network (Pix2Pix4DepthModel's generator: ``unet_1024``, 2 -> 1 channels, no norm),
    without define_G's random initialisation."""
    nets = _aux("leres.pix2pix.models.networks")
    net: torch.nn.Module = nets.UnetGenerator(2, 1, 10, 64, norm_layer=nets.get_norm_layer("none"), use_dropout=False)
    return net


def _merge_model(net: torch.nn.Module, device: torch.device) -> Any:
    """A Pix2Pix4DepthModel around our loaded generator. Its __init__ wants the training script's options and
    loads weights its own way; estimateboost uses only set_input/test/get_current_visuals, which need these."""
    model = object.__new__(_aux("leres.pix2pix.models.pix2pix4depth_model").Pix2Pix4DepthModel)
    model.netG, model.device, model.visual_names = net, device, ["fake_B"]
    return model


@contextlib.contextmanager
def _boosting() -> Any:
    # estimateboost keeps its patch settings in module globals and prints its progress: one at a time, quietly.
    with _boost_lock, contextlib.redirect_stdout(io.StringIO()):
        yield


# -- NormalBae (controlnet_aux's network; our glue, A1111's normal_bae) --------------------------------------------

NORMAL_BAE = ("scannet.pt",)
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _normal_bae_net() -> torch.nn.Module:
    args = types.SimpleNamespace(
        mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
    )
    # Its encoder is built through torch.hub from the bundled local repo, which prints progress: keep it quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        net: torch.nn.Module = _aux("normalbae.nets.NNET").NNET(args)
    return net


def normal_bae(img: Array, ctx: Context) -> Array:
    """Surface normals as RGB (x, y, z mapped from [-1, 1] to [0, 255])."""
    net = _net("normal_bae", ctx.annotator_dir / NORMAL_BAE[0], ctx.device, _normal_bae_net, nested="model")
    h, w = img.shape[:2]
    size = (max(64, round(w / 64) * 64), max(64, round(h / 64) * 64))
    x = (cv2.resize(img, size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255 - _IMAGENET_MEAN) / _IMAGENET_STD
    tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].to(next(net.parameters()).device)
    normal = net(tensor)[0][-1][0, :3]  # the finest prediction; channel 4 is the confidence
    rgb = ((normal + 1) * 0.5).clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
    return cv2.resize((rgb * 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)


HED = ("ControlNetHED.pth",)
PIDI = ("table5_pidinet.pth",)
_INSTEAD = "send a ready-made map with preprocessor 'none' instead"
_NOT_HERE = f"has no implementation in this build (controlnet_aux has no such annotator); {_INSTEAD}"


def _registry() -> dict[str, Preprocessor]:
    table = [
        Preprocessor("canny", canny),
        Preprocessor("shuffle", shuffle),
        Preprocessor("invert", invert),
        Preprocessor("threshold", threshold),
        Preprocessor("binary", binary),
        Preprocessor("color", color),
        Preprocessor("scribble_xdog", scribble_xdog),
        Preprocessor("tile_resample", tile_resample),
        Preprocessor("softedge_hed", _network("hed", HED), HED),
        Preprocessor("hed", _network("hed", HED), HED),
        Preprocessor("softedge_hedsafe", _network("hed", HED, safe=True), HED),
        Preprocessor("hed_safe", _network("hed", HED, safe=True), HED),
        Preprocessor("scribble_hed", _network("hed", HED, scribble=True), HED),
        Preprocessor("scribble_hedsafe", _network("hed", HED, scribble=True, safe=True), HED),
        Preprocessor("softedge_pidinet", _network("pidinet", PIDI), PIDI),
        Preprocessor("pidinet", _network("pidinet", PIDI), PIDI),
        Preprocessor("softedge_pidsafe", _network("pidinet", PIDI, safe=True), PIDI),
        Preprocessor("pidinet_safe", _network("pidinet", PIDI, safe=True), PIDI),
        Preprocessor("scribble_pidinet", _network("pidinet", PIDI, scribble=True), PIDI),
        Preprocessor("pidinet_scribble", _network("pidinet", PIDI, scribble=True), PIDI),
        Preprocessor("scribble_pidsafe", _network("pidinet", PIDI, scribble=True, safe=True), PIDI),
        Preprocessor("mlsd", _network("mlsd", ("mlsd_large_512_fp32.pth",)), ("mlsd_large_512_fp32.pth",)),
        Preprocessor(
            "lineart", _network("lineart", ("sk_model.pth", "sk_model2.pth")), ("sk_model.pth", "sk_model2.pth")
        ),
        Preprocessor(
            "lineart_realistic",
            _network("lineart", ("sk_model.pth", "sk_model2.pth")),
            ("sk_model.pth", "sk_model2.pth"),
        ),
        Preprocessor(
            "lineart_coarse",
            _network("lineart", ("sk_model.pth", "sk_model2.pth"), coarse=True),
            ("sk_model.pth", "sk_model2.pth"),
        ),
        Preprocessor("lineart_anime", _network("lineart_anime", ("netG.pth",)), ("netG.pth",)),
        Preprocessor("depth", _network("midas", MIDAS, a1111_res=True), MIDAS),  # A1111's "depth" is MiDaS
        Preprocessor("depth_midas", _network("midas", MIDAS, a1111_res=True), MIDAS),
        Preprocessor(
            "normal_map",
            _network("midas", MIDAS, a1111_res=True, depth_and_normal=True, bg_th=NORMAL_MAP_BACKGROUND),
            MIDAS,
        ),
        Preprocessor("depth_zoe", _network("zoe", ZOE, a1111_res=True), ZOE),
        Preprocessor("depth_leres", _network("leres", LERES, a1111_res=True), LERES),  # both thresholds at 0
        Preprocessor("depth_leres++", _network("leres", LERES_BOOST, a1111_res=True, boost=True), LERES_BOOST),
        Preprocessor("normal_bae", normal_bae, NORMAL_BAE),
        Preprocessor("openpose", _openpose(True, False, False), (BODY,)),
        Preprocessor("openpose_hand", _openpose(True, True, False), (BODY, HAND)),
        Preprocessor("openpose_face", _openpose(True, False, True), (BODY, FACE)),
        Preprocessor("openpose_faceonly", _openpose(False, False, True), (BODY, FACE)),
        Preprocessor("openpose_full", _openpose(True, True, True), (BODY, HAND, FACE)),
        Preprocessor("dwpose", dwpose.dwpose, dwpose.FILES),
        Preprocessor("mediapipe_face", mediapipe_face.mediapipe_face),
    ]
    unsupported = ["segmentation", "oneformer_coco", "oneformer_ade20k", "clip_vision"]
    out = {p.name: p for p in table}
    for name in unsupported:
        out[name] = Preprocessor(name, None, unsupported=_NOT_HERE)
    return out


PREPROCESSORS = _registry()
IDENTITY = ("", "none", "None")


def missing_files(name: str | None, annotator_dir: Path) -> list[str]:
    if name in IDENTITY or name is None:
        return []
    p = PREPROCESSORS.get(name)
    return [] if p is None else [f for f in p.files if not (annotator_dir / f).is_file()]


def check(name: str | None, annotator_dir: Path) -> None:
    """Raise ``JobError`` naming what is missing; the API calls this at submit, the executor again at run."""
    if name in IDENTITY or name is None:
        return
    p = PREPROCESSORS.get(name)
    if p is None:
        raise JobError(f"preprocessor {name!r} is not supported by this server")
    if p.unsupported:
        raise JobError(f"preprocessor {name!r} {p.unsupported}")
    missing = missing_files(name, annotator_dir)
    if missing:
        raise JobError(
            f"preprocessor {name!r} needs the annotator weights {', '.join(missing)}: "
            f"put them in {annotator_dir} (the models folder's annotator/ directory)"
        )


def submit_check(name: str | None, annotator_dir: Path) -> str | None:
    """Why a request naming ``name`` should be refused at submit (``INVALID_REQUEST_BODY``), or None.

    Refused: unknown names and annotators whose weight files are missing (the message names the files and the
    folder). Names this build cannot run (``unsupported``) are accepted, as the seed's enum promises, and the task
    fails with the reason.
    """
    p = PREPROCESSORS.get(name or "none")
    if p is not None and p.unsupported:
        return None
    try:
        check(name, annotator_dir)
    except JobError as exc:
        return str(exc)
    return None


def run_preprocessor(name: str | None, image: Image.Image, ctx: Context) -> Image.Image:
    """The control map for ``image`` (already at the output size), same size, RGB."""
    check(name, ctx.annotator_dir)
    if name in IDENTITY or name is None:
        return image.convert("RGB")
    p = PREPROCESSORS[name]
    assert p.run is not None
    arr = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    with torch.no_grad():
        out = p.run(arr, ctx)
    result = Image.fromarray(np.ascontiguousarray(out).astype(np.uint8)).convert("RGB")
    if result.size != image.size:
        result = result.resize(image.size, Image.Resampling.BILINEAR)
        if name.startswith("scribble"):  # scribble maps are binary: keep them so after resizing
            result = result.point(lambda v: 255 if v > 127 else 0)
    return result
