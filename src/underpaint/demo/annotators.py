"""Tiny annotator files for every preprocessor, in the layouts lllyasviel and DWPose published them with.

The networks keep their real architectures (the files must load into them, here and in controlnet_aux), so their
weights cannot be small in number; they are small on disk instead. Each tensor is a strided view over a short
random vector (``tiny_tensor``): ``torch.save`` stores only that vector, so even Zoe's BEiT-L file is a few MB,
and every weight is non-zero and varies along every dimension (two output channels never hold the same weights).
Scales follow the usual initialisation (``1/sqrt(fan_in)``), norm layers start near identity, BatchNorm running
variances are positive, so activations stay finite through the deep networks and the maps are not blank.

DWPose's two ONNX files are tiny graphs with the published input and output names and shapes: the detector reports
one person in the middle of its 640 x 640 input, the estimator a standing person's 133 keypoints in its crop.

Layouts (file -> what ``torch.load`` returns):

* ``ControlNetHED.pth`` (fp16), ``mlsd_large_512_fp32.pth``, ``sk_model.pth``, ``sk_model2.pth``,
  ``dpt_hybrid-midas-501f0c75.pt``, ``latest_net_G.pth``, ``facenet.pth``: a plain state dict;
* ``table5_pidinet.pth``: ``{"state_dict": {"module.<name>": ...}}``; ``netG.pth``: ``module.``-prefixed names;
* ``res101.pth``: ``{"depth_model": {"module.<name>": ...}}``; ``scannet.pt``: ``{"model": {"module.<name>": ...}}``;
* ``ZoeD_M12_N.pt``: ``{"model": ...}`` including BEiT's ``relative_position_index`` buffers (older timm saved them);
* ``body_pose_model.pth``, ``hand_pose_model.pth``: names without the first module level (``conv1_1.weight``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from underpaint.engine.preprocessors import dwpose, networks
from underpaint.engine.preprocessors.aux import aux
from underpaint.vocabulary import BODY_POSE_FILE, FACE_POSE_FILE, HAND_POSE_FILE

StateDict = dict[str, torch.Tensor]
_PRIMES = (1, 2, 3, 5, 7, 11, 13, 17)


def tiny_tensor(
    shape: torch.Size, dtype: torch.dtype, gen: torch.Generator, scale: float, shift: float, positive: bool = False
) -> torch.Tensor:
    """``shift + scale * N(0, 1)`` values (``abs`` of them: ``positive``) of ``shape`` as a view over a short
    vector: element ``(i, j, ...)`` is ``v[... + 2 i + j]`` (strides the first primes, last dimension 1)."""
    strides = tuple(reversed(_PRIMES[: len(shape)]))
    length = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    base = torch.randn(length, generator=gen) * scale + shift
    base = (base.abs() if positive else base).to(dtype)
    return base.as_strided(tuple(shape), strides)


def tiny_state(build: Callable[[], torch.nn.Module], seed: int, dtype: torch.dtype = torch.float32) -> StateDict:
    """Seeded, non-zero, tiny-on-disk weights for the network ``build()`` makes (built on the meta device)."""
    with torch.device("meta"):
        shapes = build().state_dict()
    gen = torch.Generator().manual_seed(seed)
    out: StateDict = {}
    for name, meta in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if not meta.is_floating_point():  # num_batches_tracked, index buffers
            out[name] = torch.zeros((), dtype=meta.dtype).expand(meta.shape)
        elif leaf == "running_var":
            out[name] = tiny_tensor(meta.shape, dtype, gen, 0.05, 1.0, positive=True)
        elif leaf == "running_mean" or (meta.dim() <= 1 and leaf != "weight"):
            out[name] = tiny_tensor(meta.shape, dtype, gen, 0.05, 0.0)  # biases, layer scales, ...
        elif meta.dim() <= 1:
            out[name] = tiny_tensor(meta.shape, dtype, gen, 0.1, 1.0)  # norm weights, near 1
        else:
            fan_in = math.prod(meta.shape[1:])
            out[name] = tiny_tensor(meta.shape, dtype, gen, 1.0 / math.sqrt(fan_in), 0.0)
    return out


def _module(state: StateDict) -> StateDict:
    return {"module." + k: v for k, v in state.items()}


def _strip_first(state: StateDict) -> StateDict:
    return {k.split(".", 1)[1]: v for k, v in state.items()}


def _zoe_file(seed: int) -> dict[str, StateDict]:
    state = tiny_state(networks.zoe_net, seed)
    # The published file, written by an older timm, also holds BEiT's relative_position_index buffers.
    with torch.device("meta"):
        indices = {k: v for k, v in networks.zoe_net().named_buffers() if k.endswith("relative_position_index")}
    state.update({k: torch.zeros((), dtype=torch.int64).expand(v.shape) for k, v in indices.items()})
    return {"model": state}


def _face_net() -> torch.nn.Module:
    net: torch.nn.Module = aux("open_pose.face").FaceNet()
    return net


def _body_net() -> torch.nn.Module:
    net: torch.nn.Module = aux("open_pose.model").bodypose_model()
    return net


def _hand_net() -> torch.nn.Module:
    net: torch.nn.Module = aux("open_pose.model").handpose_model()
    return net


def _torch_files() -> dict[str, Callable[[int], object]]:
    """File name -> its content for a seed."""
    return {
        "ControlNetHED.pth": lambda s: tiny_state(networks.hed_net, s, torch.float16),
        "table5_pidinet.pth": lambda s: {"state_dict": _module(tiny_state(networks.pidinet_net, s))},
        "mlsd_large_512_fp32.pth": lambda s: tiny_state(networks.mlsd_net, s),
        "sk_model.pth": lambda s: tiny_state(networks.lineart_net, s),
        "sk_model2.pth": lambda s: tiny_state(networks.lineart_net, s),
        "netG.pth": lambda s: _module(tiny_state(networks.lineart_anime_net, s)),
        "dpt_hybrid-midas-501f0c75.pt": lambda s: tiny_state(networks.midas_net, s),
        "ZoeD_M12_N.pt": _zoe_file,
        "res101.pth": lambda s: {"depth_model": _module(tiny_state(networks.leres_net, s))},
        "latest_net_G.pth": lambda s: tiny_state(networks.merge_net, s),
        "scannet.pt": lambda s: {"model": _module(tiny_state(networks.normal_bae_net, s))},
        BODY_POSE_FILE: lambda s: _strip_first(tiny_state(_body_net, s)),
        HAND_POSE_FILE: lambda s: _strip_first(tiny_state(_hand_net, s)),
        FACE_POSE_FILE: lambda s: tiny_state(_face_net, s),
    }


TORCH_FILES = tuple(_torch_files())
ONNX_FILES = dwpose.FILES
FIRST_SEED = 5000


def write_torch_annotator(name: str, annotator_dir: Path, seed: int) -> Path:
    path = Path(annotator_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_torch_files()[name](seed), str(path))
    return path


# -- DWPose (ONNX) --------------------------------------------------------------------------------------------------

_DET_INPUT, _POSE_INPUT = (1, 3, *dwpose.DETECTOR_INPUT), (1, 3, *dwpose.ESTIMATOR_INPUT)
# A standing person in the estimator's 288 x 384 crop: COCO's 17 body keypoints (nose, eyes, ears, shoulders,
# elbows, wrists, hips, knees, ankles; the person's left on the image's right).
_BODY = [
    (144, 70), (152, 62), (136, 62), (162, 66), (126, 66), (176, 110), (112, 110), (188, 160), (100, 160),
    (194, 205), (94, 205), (166, 205), (122, 205), (168, 260), (120, 260), (170, 315), (118, 315),
]  # fmt: skip


def fixed_onnx(input_name: str, input_shape: tuple[int, ...], outputs: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A graph with the published input whose outputs are constants (plus 0 x the input's mean, to consume it)."""
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
    ]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    for name, value in outputs.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_value"))
        nodes.append(helper.make_node("Add", [f"{name}_value", "nothing"], [name]))
    graph = helper.make_graph(
        nodes,
        "underpaint_demo",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in outputs.items()],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _detector_output() -> np.ndarray:
    """YOLOX rows (anchors of strides 8/16/32 on 640) with one person (score 0.9) boxed in the input's middle."""
    cells, strides = dwpose.yolox_grid(dwpose.DETECTOR_INPUT)
    raw = np.zeros((1, len(cells), 5 + 80), np.float32)
    x1, y1, x2, y2 = 220.0, 100.0, 420.0, 540.0
    stride = 32.0
    i = int(np.flatnonzero((strides[:, 0] == stride) & (cells[:, 0] == 10) & (cells[:, 1] == 10))[0])
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    raw[0, i, :4] = (cx / stride - 10, cy / stride - 10, math.log((x2 - x1) / stride), math.log((y2 - y1) / stride))
    raw[0, i, 4], raw[0, i, 5] = 0.95, 0.95
    return raw


def _estimator_outputs() -> dict[str, np.ndarray]:
    """SimCC outputs placing the body, a fan of face points and both hands in the crop (0.9 confidence)."""
    points: dict[int, tuple[float, float]] = dict(enumerate(_BODY))
    for i in range(68):  # the face: an oval around the nose
        a = 2 * math.pi * i / 68
        points[23 + i] = (144 + 14 * math.cos(a), 66 + 18 * math.sin(a))
    for i in range(21):  # the hands fan out below the wrists
        points[91 + i] = (194 + i // 4 * 3, 210 + i % 4 * 4)
        points[112 + i] = (94 - i // 4 * 3, 210 + i % 4 * 4)
    sx = np.zeros((1, dwpose.KEYPOINTS, int(_POSE_INPUT[3] * dwpose.SIMCC_SPLIT)), np.float32)
    sy = np.zeros((1, dwpose.KEYPOINTS, int(_POSE_INPUT[2] * dwpose.SIMCC_SPLIT)), np.float32)
    for k, (x, y) in points.items():
        sx[0, k, round(x * dwpose.SIMCC_SPLIT)] = 0.9
        sy[0, k, round(y * dwpose.SIMCC_SPLIT)] = 0.9
    return {"simcc_x": sx, "simcc_y": sy}


def write_dwpose(annotator_dir: Path) -> list[Path]:
    folder = Path(annotator_dir)
    folder.mkdir(parents=True, exist_ok=True)
    det, pose = folder / dwpose.DETECTOR, folder / dwpose.ESTIMATOR
    onnx.save(fixed_onnx("images", _DET_INPUT, {"output": _detector_output()}), str(det))
    onnx.save(fixed_onnx("input", _POSE_INPUT, _estimator_outputs()), str(pose))
    return [det, pose]


def write_demo_annotators(annotator_dir: Path) -> dict[str, Path]:
    """Every annotator file of ``vocabulary.PREPROCESSOR_FILES`` into ``annotator_dir`` (seeded, deterministic)."""
    out = {name: write_torch_annotator(name, annotator_dir, FIRST_SEED + i) for i, name in enumerate(TORCH_FILES)}
    out.update({p.name: p for p in write_dwpose(annotator_dir)})
    return out
