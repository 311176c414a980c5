"""ControlNet preprocessors ("annotators"): turn a unit's image into the control map its ControlNet expects.

Every name the Novita docs/JS SDK and the Python SDK send is known here. Three groups:

* weight-free, work out of the box: ``canny``, ``shuffle`` and the Python SDK's ``invert``, ``threshold``,
  ``color``, ``scribble_xdog``, ``tile_resample``, ``binary``;
* network annotators whose weights the operator drops into ``M/annotator/`` (file names as published with
  lllyasviel's ControlNet annotators): HED, PiDiNet, MLSD, lineart, lineart_anime — the network definitions come
  from the ``controlnet_aux`` package, weights are loaded with ``torch.load(weights_only=True)``;
* annotators that need packages this build cannot install beside the CPU torch wheel (torchvision, timm, mmpose,
  mediapipe): depth_midas/zoe/leres, normal_bae, openpose*, dwpose, mediapipe_face. They are accepted by the API
  and fail the task with a reason saying so; pass a ready-made map with preprocessor ``none`` instead.

``none`` (or no preprocessor) uses the image as the control map.
"""

from __future__ import annotations

import importlib
import os
import sys
import sysconfig
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

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
    # Difference of Gaussians, thresholded (A1111 threshold 32).
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255)
    return _gray3(np.where(dog > 255 - 32, 0, 255).astype(np.uint8))


def tile_resample(img: Array, ctx: Context) -> Array:
    return img


# -- network annotators (controlnet_aux definitions, our weight loading) -----------------------------------


def _aux(module: str) -> Any:
    """Import a controlnet_aux submodule without running its package __init__ (which pulls torchvision)."""
    if "controlnet_aux" not in sys.modules:
        pkg = types.ModuleType("controlnet_aux")
        pkg.__path__ = [os.path.join(sysconfig.get_paths()["purelib"], "controlnet_aux")]
        sys.modules["controlnet_aux"] = pkg
    return importlib.import_module(f"controlnet_aux.{module}")


_nets: dict[tuple[str, Path], Any] = {}
_nets_lock = threading.Lock()


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k.replace("module.", ""): v for k, v in state.items()}


def _net(kind: str, path: Path, build: Callable[[], torch.nn.Module]) -> Any:
    key = (kind, path)
    with _nets_lock:
        if key not in _nets:
            net = build()
            try:
                net.load_state_dict(_load_state(path))
            except Exception as exc:  # wrong file, truncated download ...
                raise JobError(f"annotator weights {path.name} could not be loaded for {kind}: {exc}") from exc
            _nets[key] = net.float().eval()
        return _nets[key]


def _detector(kind: str, files: tuple[str, ...], ctx: Context) -> Any:
    paths = [ctx.annotator_dir / f for f in files]
    if kind == "hed":
        m = _aux("hed")
        return m.HEDdetector(_net(kind, paths[0], m.ControlNetHED_Apache2))
    if kind == "pidinet":
        m = _aux("pidi")
        return m.PidiNetDetector(_net(kind, paths[0], _aux("pidi.model").pidinet))
    if kind == "mlsd":
        m = _aux("mlsd")
        return m.MLSDdetector(_net(kind, paths[0], _aux("mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large))
    if kind == "lineart":
        m = _aux("lineart")
        return m.LineartDetector(
            _net(kind, paths[0], lambda: m.Generator(3, 1, 3)), _net(kind + "_coarse", paths[1], lambda: m.Generator(3, 1, 3))
        )
    if kind == "lineart_anime":
        import functools

        m = _aux("lineart_anime")
        norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
        return m.LineartAnimeDetector(_net(kind, paths[0], lambda: m.UnetGenerator(3, 1, 8, 64, norm_layer=norm)))
    raise AssertionError(kind)


def _network(kind: str, files: tuple[str, ...], **call_kwargs: Any) -> Callable[[Array, Context], Array]:
    def run(img: Array, ctx: Context) -> Array:
        detector = _detector(kind, files, ctx)
        h, w = img.shape[:2]
        res = min(h, w)  # detect at the output resolution; the map is resized to the exact size below
        out = detector(img, detect_resolution=res, image_resolution=res, output_type="np", **call_kwargs)
        return _gray3(np.asarray(out))

    return run


HED = ("ControlNetHED.pth",)
PIDI = ("table5_pidinet.pth",)
_TORCHVISION = (
    "needs torchvision/timm, which cannot be installed beside this build's CPU torch wheel; "
    "send a ready-made map with preprocessor 'none' instead"
)


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
        Preprocessor("lineart", _network("lineart", ("sk_model.pth", "sk_model2.pth")), ("sk_model.pth", "sk_model2.pth")),
        Preprocessor(
            "lineart_realistic", _network("lineart", ("sk_model.pth", "sk_model2.pth")), ("sk_model.pth", "sk_model2.pth")
        ),
        Preprocessor(
            "lineart_coarse",
            _network("lineart", ("sk_model.pth", "sk_model2.pth"), coarse=True),
            ("sk_model.pth", "sk_model2.pth"),
        ),
        Preprocessor("lineart_anime", _network("lineart_anime", ("netG.pth",)), ("netG.pth",)),
    ]
    unsupported = [
        "depth", "depth_midas", "depth_zoe", "depth_leres", "depth_leres++", "normal_bae", "normal_map",
        "openpose", "openpose_face", "openpose_faceonly", "openpose_full", "openpose_hand", "dwpose",
        "mediapipe_face", "segmentation", "oneformer_coco", "oneformer_ade20k", "clip_vision",
    ]
    out = {p.name: p for p in table}
    for name in unsupported:
        out[name] = Preprocessor(name, None, unsupported=_TORCHVISION)
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
