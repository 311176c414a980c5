"""The one reader of weights files: every model the engine loads from a single file (checkpoints, VAEs, LoRAs,
embeddings, IP-Adapters, ControlNets, upscalers, annotator networks) is read here.

``.safetensors`` files are read with safetensors (tensors and the ``__metadata__`` strings, nothing else can be in
them); torch pickles (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) only through ``torch.load(weights_only=True)``, whose
unpickler builds tensors and plain containers and refuses any other global, so no pickled code runs. The format comes
from the file's suffix (``weight_headers.weights_format``, shared with the torch-free header reader the registry and
the API use). Every failure is an ``UnreadableWeights`` naming the file and the reason: a pickle that names code is
"refused to load", never loaded.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from underpaint.engine.job import JobError
from underpaint.weight_headers import weights_format

StateDict = dict[str, torch.Tensor]


class ModelLoadError(JobError, ValueError):
    """A model file that cannot be used: unreadable, unsafe, or not the kind of model it is filed as. A ``JobError``
    (the task fails with this message); still a ``ValueError`` for callers outside a task."""


class UnreadableWeights(ModelLoadError):
    """The file could not be read as weights at all (damaged, not a weights file, or a pickle refused for
    safety). ``str(exc)`` is ``"<file name>: <reason>"``; callers that name the model themselves use ``reason``."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class WeightsFile:
    """What a weights file stores: ``data`` as saved (a flat name -> tensor dict for safetensors; for a pickle
    whatever its tensors and containers make, nesting such as ``state_dict`` kept), and the safetensors
    ``__metadata__`` (empty for pickles)."""

    data: object
    metadata: dict[str, str] = field(default_factory=dict)


# How torch's ``weights_only`` unpickler names the global it refused (``builtins.`` is left off).
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def _pickle_failure(exc: pickle.UnpicklingError) -> str:
    """Why a pickle could not be read: refused (it names something other than tensors and plain containers,
    which torch's ``weights_only`` unpickler never builds), or not a torch pickle at all."""
    text = str(exc)
    if not text.startswith("Weights only load failed") or "Unsupported operand" in text:
        return "cannot read weights: not a torch pickle (a damaged download or another kind of file)"
    found = _REFUSED_GLOBAL.search(text)
    what = f"names {found.group(1)}" if found else "holds objects other than tensors"
    return (
        f"refused to load: the pickle {what} (possibly code, never run here); only tensors are read from "
        "pickles: convert the file to .safetensors"
    )


def read_weights(path: Path) -> WeightsFile:
    """Read a ``.safetensors`` file or a torch pickle onto the CPU; never runs pickled code. Raises
    ``UnreadableWeights``."""
    path = Path(path)
    kind = weights_format(path)
    try:
        if kind == "safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no iter
            return WeightsFile(tensors, metadata)
        if kind == "pickle":
            return WeightsFile(torch.load(str(path), map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as exc:
        raise UnreadableWeights(path.name, _pickle_failure(exc)) from exc
    except Exception as exc:  # safetensors, torch and the OS raise many unrelated types for damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnreadableWeights(path.name, f"cannot read weights: {first}") from exc
    raise UnreadableWeights(path.name, f"unsupported weights format {path.suffix!r}")


def read_weights_mapping(path: Path) -> Mapping[str, Any]:
    """The top-level mapping of a weights file, as stored (nesting such as ``state_dict`` or Real-ESRGAN's
    ``params_ema`` kept). Raises ``UnreadableWeights``, also when the file holds something else (a bare tensor)."""
    data = read_weights(path).data
    if not isinstance(data, Mapping):
        raise UnreadableWeights(Path(path).name, f"not a state dict (holds a {type(data).__name__})")
    return data


def unnest(data: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    """``data`` with its ``state_dict`` nesting (and that under any of ``keys``) taken off, as often as it nests."""
    names = ("state_dict", *keys)
    while True:
        inner = next((data[k] for k in names if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            return data
        data = inner


def load_state_dict_file(path: Path) -> StateDict:
    """The tensors of a weights file, un-nested from ``state_dict``; never runs pickled code. Raises
    ``ModelLoadError``."""
    raw = unnest(read_weights_mapping(path))
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelLoadError(f"{Path(path).name}: contains no tensors")
    return tensors
