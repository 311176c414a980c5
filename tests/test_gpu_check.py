"""scripts/gpu-check: what it carries matches the project's pins and fits the device call's 64 MiB."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(ROOT / "scripts" / "gpu-check"))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for spec in project["dependencies"]:
        m = re.match(r"([A-Za-z0-9_.\-]+)(\[.*\])?==(.+)", spec)
        assert m, spec
        out[m.group(1).lower().replace("-", "_")] = m.group(3)
    return out


def test_carried_wheels_are_the_pinned_versions_and_never_torch() -> None:
    gpu_check = _script()
    pins = _pins()
    carried = {name.lower().replace("-", "_"): version for name, version in gpu_check.CARRY}
    assert not {"torch", "torchvision", "numpy"} & set(carried), "the device image's own builds must stay"
    for name, version in carried.items():
        if name in pins:
            assert version == pins[name], f"{name}: carried {version}, pinned {pins[name]}"
    # The engine's and the API's own pins that the image lacks are all carried.
    for needed in (
        "diffusers",
        "transformers",
        "fastapi",
        "starlette",
        "pydantic",
        "uvicorn",
        "sqlalchemy",
        "torchsde",
        "spandrel",
    ):
        assert needed in carried, needed


def test_wheel_folder_is_ignored_and_the_tree_fits_the_device_call() -> None:
    gpu_check = _script()
    ignored = subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=ROOT).returncode
    assert ignored == 0
    # Without the wheels (prepare adds ~28 MiB), the tree leaves room for them under the limit.
    tree = gpu_check.travelling_bytes() - sum(p.stat().st_size for p in gpu_check.wheel_files())
    assert tree < gpu_check.LIMIT_BYTES - 32 * 2**20, f"{tree / 2**20:.1f} MiB"
