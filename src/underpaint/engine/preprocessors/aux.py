"""Importing controlnet_aux's submodules without running its package ``__init__``.

controlnet_aux's ``__init__`` imports every detector it has: mediapipe and mmpose probes, and segment_anything,
whose import overwrites entries of timm's model registry (which Zoe's BEiT backbone is built from). We use only
a few submodules (network definitions, detectors' pre- and postprocessing, drawing helpers), so the package is
registered in ``sys.modules`` as a bare namespace package over its installed folder, and Python then imports the
submodules we ask for without executing ``__init__``.

``install_namespace`` does that once, explicitly: the registry calls it on first use of a network annotator (and
tests that build controlnet_aux's own detectors as references call it too). It is idempotent: if controlnet_aux is
already in ``sys.modules`` (as a namespace or fully imported by someone else) it is left as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from pathlib import Path
from types import ModuleType

PACKAGE = "controlnet_aux"
_lock = threading.Lock()


def install_namespace() -> None:
    """Register ``controlnet_aux`` as a namespace package over its installed folder, unless already imported."""
    with _lock:
        if PACKAGE in sys.modules:
            return
        spec = importlib.util.find_spec(PACKAGE)  # finds the folder; does not execute the package
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("controlnet_aux is not installed (scripts/bootstrap installs it --no-deps)")
        pkg = types.ModuleType(PACKAGE)
        pkg.__path__ = [str(Path(p)) for p in spec.submodule_search_locations]
        sys.modules[PACKAGE] = pkg


def aux(module: str) -> ModuleType:
    """``controlnet_aux.<module>``, imported without the package's ``__init__``."""
    install_namespace()
    return importlib.import_module(f"{PACKAGE}.{module}")
