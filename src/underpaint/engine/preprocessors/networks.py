"""Network annotators: HED, PiDiNet, MLSD, lineart, lineart_anime, MiDaS depth and normal_map, Zoe, LeReS
(``++``: with boosting) and NormalBae.

The network definitions, the detectors' pre- and postprocessing come from controlnet_aux (``aux``); the weights are
the files lllyasviel published, read by ``engine.weights`` (``torch.load(weights_only=True)`` for these pickles) and
loaded strictly into networks built without pretrained weights (nothing downloads). Loaded networks live in the executor's ``AnnotatorCache``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from underpaint.engine.job import JobError
from underpaint.engine.preprocessors.aux import aux
from underpaint.engine.preprocessors.context import Context
from underpaint.engine.preprocessors.maps import gray3
from underpaint.engine.weights import UnreadableWeights, read_weights_mapping, unnest

Array = np.ndarray

# A1111's default "Normal Background Threshold" of normal_map: normals flattened where depth < 40% of its range.
NORMAL_MAP_BACKGROUND = 0.4
# estimateboost (LeReS++) keeps its patch settings in module globals: one boosted estimate at a time per process.
_boost_lock = threading.Lock()


def load_state(path: Path, nested: str | None = None) -> dict[str, torch.Tensor]:
    """A plain state dict from an annotator file: un-nested (``state_dict`` or ``nested``), DataParallel's
    leading ``module.`` dropped."""
    state = unnest(read_weights_mapping(path), *([nested] if nested else []))
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def network(
    ctx: Context,
    kind: str,
    path: Path,
    build: Callable[[], torch.nn.Module],
    strip_prefix: bool = False,
    nested: str | None = None,
) -> Any:
    """``build()`` with the weights of ``path``, on the context's device, through its cache. ``strip_prefix``: the
    file's names lack the first module level (the OpenPose files: ``conv1_1.weight`` for the network's
    ``model0.conv1_1.weight``); ``nested``: the state dict sits under that key (LeReS: ``depth_model``, Zoe:
    ``model``)."""

    def load() -> torch.nn.Module:
        net = build()
        try:
            state = load_state(path, nested)
            if strip_prefix:
                state = {k: state[k.split(".", 1)[1]] for k in net.state_dict()}
            # Buffers the network computes at build and no longer saves (timm's BEiT relative_position_index,
            # which the older timm the Zoe file was written with did save) come from the build, not the file.
            transient = {name for name, _ in net.named_buffers()} - net.state_dict().keys()
            state = {k: v for k, v in state.items() if k not in transient}
            # Strict whatever the class overrides: ZoeDepth's own load_state_dict is non-strict under timm 1.x.
            torch.nn.Module.load_state_dict(net, state)
        except UnreadableWeights as exc:
            raise JobError(f"annotator weights {path.name} could not be loaded for {kind}: {exc.reason}") from exc
        except Exception as exc:  # the wrong file for this network ...
            raise JobError(f"annotator weights {path.name} could not be loaded for {kind}: {exc!r}") from exc
        return net.float().eval().to(ctx.device)

    return ctx.nets.get(kind, path, str(ctx.device), load)


# -- network builders (no weights, nothing downloaded) ------------------------------------------------------------


def hed_net() -> torch.nn.Module:
    net: torch.nn.Module = aux("hed").ControlNetHED_Apache2()
    return net


def pidinet_net() -> torch.nn.Module:
    net: torch.nn.Module = aux("pidi.model").pidinet()
    return net


def mlsd_net() -> torch.nn.Module:
    net: torch.nn.Module = aux("mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large()
    return net


def lineart_net() -> torch.nn.Module:
    net: torch.nn.Module = aux("lineart").Generator(3, 1, 3)
    return net


def lineart_anime_net() -> torch.nn.Module:
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    net: torch.nn.Module = aux("lineart_anime").UnetGenerator(3, 1, 8, 64, norm_layer=norm)
    return net


def midas_net() -> torch.nn.Module:
    # MiDaS v3 DPT-Hybrid, as controlnet_aux's MiDaSInference("dpt_hybrid") builds it; path=None: no download.
    dpt = aux("midas.midas.dpt_depth").DPTDepthModel
    net: torch.nn.Module = dpt(path=None, backbone="vitb_rn50_384", non_negative=True)
    return net


def zoe_net() -> torch.nn.Module:
    # ZoeD_M12_N: ZoeDepth on a MiDaS BEiT-L core, built from the bundled MiDaS repo (torch.hub source="local")
    # with use_pretrained_midas=False in the "infer" config: nothing is downloaded.
    config = aux("zoe.zoedepth.utils.config").get_config("zoedepth", "infer")
    net: torch.nn.Module = aux("zoe").ZoeDepth.build_from_config(config)
    return net


def leres_net() -> torch.nn.Module:
    net: torch.nn.Module = aux("leres.leres.multi_depth_model_woauxi").RelDepthModel(backbone="resnext101")
    return net


def merge_net() -> torch.nn.Module:
    """The boosting merge network (Pix2Pix4DepthModel's generator: ``unet_1024``, 2 -> 1 channels, no norm),
    without define_G's random initialisation."""
    nets = aux("leres.pix2pix.models.networks")
    net: torch.nn.Module = nets.UnetGenerator(2, 1, 10, 64, norm_layer=nets.get_norm_layer("none"), use_dropout=False)
    return net


def normal_bae_net() -> torch.nn.Module:
    args = types.SimpleNamespace(
        mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
    )
    # Its encoder is built through torch.hub from the bundled local repo, which prints progress: keep it quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        net: torch.nn.Module = aux("normalbae.nets.NNET").NNET(args)
    return net


def _merge_model(net: torch.nn.Module, device: torch.device) -> Any:
    """A Pix2Pix4DepthModel around our loaded generator. Its __init__ wants the training script's options and
    loads weights its own way; estimateboost uses only set_input/test/get_current_visuals, which need these."""
    model = object.__new__(aux("leres.pix2pix.models.pix2pix4depth_model").Pix2Pix4DepthModel)
    model.netG, model.device, model.visual_names = net, device, ["fake_B"]
    return model


def detector(kind: str, files: tuple[str, ...], ctx: Context) -> Any:
    """controlnet_aux's detector for ``kind`` around our loaded networks."""
    paths = [ctx.annotator_dir / f for f in files]
    if kind == "midas":
        return aux("midas").MidasDetector(network(ctx, kind, paths[0], midas_net))
    if kind == "zoe":
        return aux("zoe").ZoeDetector(network(ctx, kind, paths[0], zoe_net, nested="model"))
    if kind == "leres":
        depth = network(ctx, kind, paths[0], leres_net, nested="depth_model")
        merge = _merge_model(network(ctx, "leres_merge", paths[1], merge_net), ctx.device) if paths[1:] else None
        return aux("leres").LeresDetector(depth, merge)
    if kind == "hed":
        return aux("hed").HEDdetector(network(ctx, kind, paths[0], hed_net))
    if kind == "pidinet":
        return aux("pidi").PidiNetDetector(network(ctx, kind, paths[0], pidinet_net))
    if kind == "mlsd":
        return aux("mlsd").MLSDdetector(network(ctx, kind, paths[0], mlsd_net))
    if kind == "lineart":
        return aux("lineart").LineartDetector(
            network(ctx, kind, paths[0], lineart_net), network(ctx, kind + "_coarse", paths[1], lineart_net)
        )
    if kind == "lineart_anime":
        return aux("lineart_anime").LineartAnimeDetector(network(ctx, kind, paths[0], lineart_anime_net))
    raise AssertionError(kind)


@contextlib.contextmanager
def _boosting() -> Iterator[None]:
    # estimateboost keeps its patch settings in module globals and prints its progress: one at a time, quietly.
    with _boost_lock, contextlib.redirect_stdout(io.StringIO()):
        yield


def detect(
    kind: str, files: tuple[str, ...], depth: bool = False, **call_kwargs: Any
) -> Callable[[Array, Context], Array]:
    """Run controlnet_aux's detector for ``kind`` on our loaded networks. It detects with the short side at the
    context's ``depth_resolution`` (the depth family, ``depth``) or at the output's; ``run_preprocessor`` resizes
    the map to the output size."""

    def run(img: Array, ctx: Context) -> Array:
        found = detector(kind, files, ctx)
        res = ctx.depth_resolution if depth else min(img.shape[:2])
        with _boosting() if call_kwargs.get("boost") else contextlib.nullcontext():
            out = found(img, detect_resolution=res, image_resolution=res, output_type="np", **call_kwargs)
        if isinstance(out, tuple):  # MiDaS with depth_and_normal: (depth, normal)
            out = out[1]
        return gray3(np.asarray(out))

    return run


# -- NormalBae (controlnet_aux's network; our glue, A1111's normal_bae) --------------------------------------------

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normal_bae(files: tuple[str, ...]) -> Callable[[Array, Context], Array]:
    def run(img: Array, ctx: Context) -> Array:
        """Surface normals as RGB (x, y, z mapped from [-1, 1] to [0, 255])."""
        net = network(ctx, "normal_bae", ctx.annotator_dir / files[0], normal_bae_net, nested="model")
        h, w = img.shape[:2]
        size = (max(64, round(w / 64) * 64), max(64, round(h / 64) * 64))
        x = cv2.resize(img, size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        x = (x - _IMAGENET_MEAN) / _IMAGENET_STD
        tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].to(next(net.parameters()).device)
        normal = net(tensor)[0][-1][0, :3]  # the finest prediction; channel 4 is the confidence
        rgb = ((normal + 1) * 0.5).clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
        return cv2.resize((rgb * 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)

    return run
