"""Shared test setup: one torch thread, offline hub, tiny models built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------- tiny models

import hashlib  # noqa: E402
import shutil  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from tests.support.schedule import longest_first  # noqa: E402


def _demo_cache_key() -> str:
    """Changes whenever the code or library versions that shape the tiny files change."""
    import diffusers
    import transformers

    import underpaint.demo.adapters as demo_adapters
    import underpaint.demo.annotators as demo_annotators
    import underpaint.demo.checkpoints as demo
    import underpaint.demo.controlnet as demo_controlnet
    import underpaint.demo.ldm_convert as convert
    import underpaint.demo.models as demo_models
    import underpaint.demo.upscalers as demo_upscalers

    digest = hashlib.sha256()
    for module in (demo, convert, demo_controlnet, demo_adapters, demo_annotators, demo_models, demo_upscalers):
        digest.update(Path(str(module.__file__)).read_bytes())
    digest.update(f"{torch.__version__}/{diffusers.__version__}/{transformers.__version__}".encode())
    return digest.hexdigest()[:16]


def _cached_demo_models() -> Path:
    """Build the tiny models once per code version under ~/.cache/underpaint-test (atomic publish by rename)."""
    from underpaint.demo.models import write_all_demo_models

    root = Path(os.environ.get("UNDERPAINT_TEST_CACHE", Path.home() / ".cache" / "underpaint-test"))
    final = root / _demo_cache_key()
    if (final / ".complete").exists():
        return final
    staging = root / f".staging-{uuid.uuid4().hex}"
    write_all_demo_models(staging)
    (staging / ".complete").write_text("ok")
    try:
        staging.rename(final)
    except OSError:  # another session published the same version first
        shutil.rmtree(staging, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder (``M/``) with tiny-sd15(.safetensors + .config/), tiny-sdxl, tiny-sd15-diffusers and
    vae/tiny-vae.safetensors; a private copy per session, but treat it as read-only (copy it to modify it)."""
    dest = tmp_path_factory.mktemp("models") / "models"
    shutil.copytree(_cached_demo_models(), dest, ignore=shutil.ignore_patterns(".complete"))
    return dest


# ---------------------------------------------------------------------------------------------------- tiers

_DESELECTED_REASONS: list[str] = []


def _deselect_reason(item: pytest.Item) -> str | None:
    on_cpu_on_purpose = os.environ.get("UNDERPAINT_CUDA_TEST_DEVICE") == "cpu"  # gpu-check run --cpu-dry-run
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available() and not on_cpu_on_purpose:
        return "cuda: torch sees no CUDA device here (scripts/gpu-check runs them on a GPU machine)"
    if item.get_closest_marker("realshape") is not None and os.environ.get("UNDERPAINT_REALSHAPE") != "1":
        return "realshape: minutes and GBs per model; run with UNDERPAINT_REALSHAPE=1 (see README, 'Test tiers')"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Whole-service tests (``tests/e2e``: real servers, SDKs, browsers) are ``slow``, so that
    ``-m "not slow and not services"`` is a fast tier for everyday work. CI runs every test.

    Deselect (never skip) the tiers this machine cannot or should not run, and say so in the summary: a
    deselected test is not reported as passed or skipped, so nothing hides a failure."""
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if e2e in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.slow)
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    reasons: dict[str, int] = {}
    for item in items:
        reason = _deselect_reason(item)
        if reason is None:
            keep.append(item)
        else:
            dropped.append(item)
            reasons[reason] = reasons.get(reason, 0) + 1
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
        _DESELECTED_REASONS[:] = [f"{n} deselected: {reason}" for reason, n in reasons.items()]
    workeroutput = getattr(config, "workeroutput", None)  # a pytest-xdist worker: tell the controller
    if workeroutput is not None:
        workeroutput["deselected_reasons"] = list(_DESELECTED_REASONS)
        # The longest files first, so that both workers finish together (tests/support/schedule.py); the
        # controller hands files out in this order under ``--no-loadscope-reorder`` (scripts/test).
        items[:] = longest_first(items)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist's controller collects nothing itself: every worker deselects the same tests, so any worker's
    reasons are the run's."""
    reasons = getattr(node, "workeroutput", {}).get("deselected_reasons")
    if reasons and not _DESELECTED_REASONS:
        _DESELECTED_REASONS[:] = reasons


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _DESELECTED_REASONS:
        terminalreporter.write_line(line)
