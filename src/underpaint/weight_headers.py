"""What a weights file holds, told from its header alone, without torch and without running any of its code.

The two formats the models folder takes, by file suffix (``weights_format``): ``.safetensors`` (an 8-byte length, a
JSON header naming every tensor with its dtype, shape and offsets, then the raw data) and torch pickles (``.ckpt``,
``.pt``, ``.pth``, ``.bin``: ``torch.save``'s zip with a ``data.pkl``, or the legacy bare pickle). This module reads
the safetensors header and the structure of a zip pickle's ``data.pkl`` (every global it names replaced by a
harmless stand-in, no tensor data read), so that the registry and the API, which never import torch, can tell a
file's tensor names and shapes and refuse a file that could not load (``weights_problem``).

The tensors themselves are read by ``engine.weights`` alone (safetensors, or pickles only through
``torch.load(weights_only=True)``); both modules take the format from ``weights_format``.
"""

from __future__ import annotations

import collections
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Literal

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WeightsFormat = Literal["safetensors", "pickle"]

_MAX_HEADER = 100 * 1024 * 1024
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # protocols 2-5: legacy torch.save files
_TENSOR_REBUILDERS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}


def weights_format(name: str | Path) -> WeightsFormat | None:
    """The format of a weights file, from its name's suffix; None for anything else (ONNX, folders ...)."""
    suffix = Path(name).suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    return "pickle" if suffix in PICKLE_SUFFIXES else None


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor name -> dtype, shape, offsets; ``__metadata__``)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER:
            raise ValueError(f"{path.name}: implausible safetensors header")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the safetensors header is not an object")
    return header


def safetensors_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and ``__metadata__`` of a .safetensors file, reading only its JSON header."""
    header = safetensors_header(path)
    meta = header.pop("__metadata__", None) or {}
    return list(header), meta


class _Opaque:
    """Stands in for every object of a torch pickle except plain containers: tensors, storages, dtypes."""

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def __setstate__(self, _state: object) -> None:
        pass


def _opaque(*_args: object, **_kwargs: object) -> _Opaque:
    return _Opaque()


class _TensorShape(_Opaque):
    """Stands in for a tensor of a torch pickle, keeping only its shape (``_rebuild_tensor_v2``'s size)."""

    def __init__(self, *args: object, **_kwargs: object) -> None:
        size = args[2] if len(args) > 2 else ()
        self.shape = tuple(int(d) for d in size) if isinstance(size, tuple | list) else ()


class _StructureUnpickler(pickle.Unpickler):
    """Reads the structure of a torch pickle without torch and without running any of its code: every global it
    names (``torch._utils._rebuild_tensor_v2``, storage classes ...) becomes a harmless stand-in, except
    ``OrderedDict``, and tensor storages are never read. ``named`` collects the globals it names."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.named: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        self.named.add(f"{module}.{name}")
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in _TENSOR_REBUILDERS:
            return _TensorShape
        return _opaque

    def persistent_load(self, pid: Any) -> object:
        return None


def _data_pkl(archive: zipfile.ZipFile) -> str | None:
    """The pickle of a ``torch.save`` zip: ``<archive name>/data.pkl``."""
    return next((n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1), None)


def _read_structure(path: Path) -> tuple[Any, set[str]] | None:
    """The unpickled structure of a zip-format torch pickle and the globals it names; None when ``path`` is not a
    zip or holds no ``data.pkl``. Damaged pickles raise."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        member = _data_pkl(archive)
        if member is None:
            return None
        with archive.open(member) as f:
            unpickler = _StructureUnpickler(f)
            return unpickler.load(), unpickler.named


def pickle_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor names and shapes of a zip-format torch pickle (``torch.save``'s format since 1.6), read from its
    ``data.pkl`` alone: no torch import, no tensor data read, no code run. ``None`` for legacy or unreadable
    files; an entry that is not a tensor has the shape ``()``."""
    try:
        read = _read_structure(path)
    except Exception:  # unsafe or damaged pickles are reported when the model is loaded
        return None
    data = read[0] if read is not None else None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        return None
    return {str(k): v.shape if isinstance(v, _TensorShape) else () for k, v in data.items()}


def tensor_names(path: Path, name: str | None = None) -> list[str] | None:
    """The tensor names of a weights file (``name`` gives the format when ``path`` is a partial download): the
    safetensors header's, or a zip pickle's (un-nested from ``state_dict``); None when they cannot be told
    without loading it. A damaged safetensors header raises ``OSError``/``ValueError``/``struct.error``."""
    if weights_format(name or path) == "safetensors":
        return safetensors_keys(path)[0]
    shapes = pickle_shapes(path)
    return list(shapes) if shapes is not None else None


def tensor_shape(path: Path, key: str) -> tuple[int, ...] | None:
    """The shape of one tensor of a weights file, from its header or its pickle's structure (see
    ``tensor_names``); None when the file does not list it."""
    if weights_format(path) == "safetensors":
        info = safetensors_header(path).get(key)
        shape = info.get("shape") if isinstance(info, dict) else None
        return tuple(int(d) for d in shape) if isinstance(shape, list) else None
    return (pickle_shapes(path) or {}).get(key)


def weights_problem(path: Path) -> str | None:
    """Why a single weights file cannot be loaded, told from its header without torch (``None`` when it looks
    loadable): a safetensors header that does not parse or lists no tensors, a zip-format torch pickle whose
    ``data.pkl`` does not parse or names globals beyond torch's own (code: ``engine.weights``' ``weights_only``
    reader refuses it), or a file that is neither. Legacy (pre-zip) torch pickles pass here and are checked on
    load."""
    name = path.name
    try:
        if weights_format(path) == "safetensors":
            keys, _ = safetensors_keys(path)
            return None if keys else f"{name}: the safetensors file holds no tensors"
        if zipfile.is_zipfile(path):
            read = _read_structure(path)
            if read is None:
                return f"{name}: a zip file without a torch pickle (data.pkl)"
            code = sorted(g for g in read[1] if not g.startswith(("torch.", "collections.OrderedDict")))
            return f"{name}: the pickle names code ({', '.join(code[:3])}); refused for safety" if code else None
        with path.open("rb") as f:
            head = f.read(2)
        return None if head in _PICKLE_MAGIC else f"{name}: neither a safetensors file nor a torch pickle"
    except Exception as exc:  # damaged headers and pickles raise assorted errors
        return f"{name}: cannot read the file's header ({type(exc).__name__}: {exc})"
