"""The order in which pytest-xdist hands out test files: the longest first.

``scripts/test`` runs ``--dist loadfile --no-loadscope-reorder``: every file runs whole on one worker, and the
workers take files in collection order. pytest-xdist's own order (most tests first) leaves the files with a few long
tests (live servers, clusters of processes) to the end, where one of the two workers runs them alone while the
other waits. Handing out the longest files first (the "longest processing time" rule) lets both workers finish
together; the files not listed are short and follow, most tests first.

``SECONDS`` is a file's whole time on this 2-core machine under pytest-xdist (measured 2026-12-05; see
bench/README.md, "Suite time"). Only the order matters: a file whose time changes a lot should move in the table,
and a renamed or deleted file must leave it (tests/test_schedule.py checks that every entry exists).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

SECONDS: dict[str, float] = {
    "tests/scale/test_scale_cluster.py": 250,
    "tests/engine/test_preprocessors_parity.py": 150,
    "tests/engine/test_batching.py": 110,
    "tests/e2e/test_durability.py": 100,
    "tests/scale/test_faults.py": 100,
    "tests/engine/test_controlnet.py": 65,
    "tests/engine/test_loader.py": 65,
    "tests/engine/test_txt2img_pixels.py": 60,
    "tests/e2e/test_playground_browser.py": 55,
    "tests/e2e/test_sdk_python.py": 55,
    "tests/scale/test_scale_cancel.py": 50,
    "tests/e2e/test_sdk_js.py": 45,
    "tests/engine/test_model_switching.py": 45,
    "tests/engine/test_compile.py": 45,
    "tests/e2e/test_half_precision.py": 45,
    "tests/api/test_schemathesis.py": 40,
    "tests/engine/test_lora.py": 40,
    "tests/e2e/test_cancel_e2e.py": 40,
    "tests/e2e/test_playground_inpaint.py": 30,
    "tests/e2e/test_generation.py": 30,
    "tests/engine/test_preprocessors.py": 30,
    "tests/engine/test_samplers_a1111_16.py": 25,
    "tests/engine/test_refiner.py": 25,
    "tests/engine/test_dpm_adaptive.py": 20,
    "tests/delivery/test_webhooks.py": 18,
    "tests/engine/test_sdxl_empty_negative.py": 18,
    "tests/e2e/test_out_of_memory.py": 18,
}


class _Item(Protocol):
    @property
    def nodeid(self) -> str: ...


T = TypeVar("T", bound=_Item)


def longest_first(items: Sequence[T]) -> list[T]:
    """``items`` regrouped by file, the files in ``SECONDS``'s order (longest first), then the others with the most
    tests first; within a file the order is unchanged (its tests may rely on it)."""
    by_file: dict[str, list[T]] = {}
    for item in items:
        by_file.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    order = sorted(by_file, key=lambda f: (-SECONDS.get(f, 0.0), -len(by_file[f])))
    return [item for f in order for item in by_file[f]]
