"""The order in which pytest-xdist hands out test files: the longest first.

``scripts/test`` runs ``--dist loadfile --no-loadscope-reorder``: every file runs whole on one worker, and the
workers take files in collection order. pytest-xdist's own order (most tests first) leaves the files with a few long
tests (live servers, clusters of processes) to the end, where one of the two workers runs them alone while the
other waits. Handing out the longest files first (the "longest processing time" rule) lets both workers finish
together; the files not listed are short and follow, most tests first.

``SECONDS`` is a file's whole time on this 2-core machine under pytest-xdist (the sum of its tests' times in a
whole run's JUnit report, 2026-12-06, three workers; ``bench/ci_time.py --schedule`` prints it); every file over
4 s is listed. The files that mostly wait (fault tests that restart services, shutdown) belong here too: left to
the end, one worker waits on them while the others have nothing left to run. Only the order matters: a file whose
time changes a lot should move in the table, and a renamed or deleted file must leave it (tests/test_schedule.py
checks that every entry exists).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

SECONDS: dict[str, float] = {
    "tests/engine/test_preprocessors_parity.py": 183,
    "tests/scale/test_scale_cluster.py": 151,
    "tests/engine/test_batching.py": 121,
    "tests/e2e/test_durability.py": 72,
    "tests/e2e/test_half_precision.py": 64,
    "tests/engine/test_controlnet.py": 47,
    "tests/engine/test_model_switching.py": 47,
    "tests/scale/test_faults_storage.py": 40,
    "tests/scale/test_faults_rabbitmq.py": 37,
    "tests/engine/test_txt2img_pixels.py": 37,
    "tests/e2e/test_playground_browser.py": 37,
    "tests/e2e/test_generation.py": 34,
    "tests/scale/test_faults.py": 33,
    "tests/e2e/test_shutdown.py": 32,
    "tests/engine/test_loader.py": 32,
    "tests/scale/test_scale_cancel.py": 31,
    "tests/api/test_schemathesis.py": 26,
    "tests/delivery/test_webhooks.py": 23,
    "tests/engine/test_lora.py": 22,
    "tests/engine/test_compile.py": 20,
    "tests/e2e/test_sdk_js.py": 19,
    "tests/scale/test_scale_parts.py": 19,
    "tests/engine/test_samplers_a1111_16.py": 18,
    "tests/engine/test_preprocessors.py": 17,
    "tests/e2e/test_cancel_e2e.py": 17,
    "tests/e2e/test_sdk_python.py": 15,
    "tests/e2e/test_delivery_e2e.py": 14,
    "tests/e2e/test_playground_inpaint.py": 13,
    "tests/engine/test_inpainting.py": 11,
    "tests/engine/test_refiner.py": 10,
    "tests/engine/test_ip_adapter.py": 9,
    "tests/api/test_api_validation.py": 9,
    "tests/engine/test_embeddings.py": 7,
    "tests/api/test_model_pull_api.py": 7,
    "tests/engine/test_samplers_parity.py": 7,
    "tests/engine/test_unet_resize.py": 7,
    "tests/delivery/test_model_pulls.py": 6,
    "tests/e2e/test_out_of_memory.py": 6,
    "tests/engine/test_upscalers.py": 5,
    "tests/tasks/test_store.py": 5,
    "tests/test_wiring.py": 5,
    "tests/engine/test_dpm_adaptive.py": 5,
    "tests/worker/test_loop_cancel.py": 5,
    "tests/worker/test_storage_pause.py": 4,
    "tests/delivery/test_model_download.py": 4,
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
