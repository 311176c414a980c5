"""Sampler names and A1111 >= 1.9's "Schedule type": how a (name, schedule type) pair resolves.

Expected values follow A1111's published rules: v1.6's sampler list (a bare name walks the uniform schedule, a
" Karras"/" Exponential" suffix picks its schedule, Restart walks Karras) and v1.9's ``get_sampler_and_scheduler``
(a schedule suffix in the name wins over the schedule type; "Automatic" is the sampler's v1.9 default).
"""

from __future__ import annotations

import pytest

from underpaint.vocabulary import (
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    SamplerName,
    SchedulerName,
    infotext_sampler,
    normalize_sampler_name,
    normalize_scheduler_name,
    resolve_sampler,
    sampler_algorithm,
    sampler_with_schedule,
)

AUTO = SchedulerName("Automatic")

# A1111 >= 1.9 (modules/sd_samplers_kdiffusion.py): the "scheduler" option of each sampler, i.e. "Automatic".
V19_AUTOMATIC = {
    "DPM++ 2M": "Karras",
    "DPM++ SDE": "Karras",
    "DPM++ 2M SDE": "Exponential",
    "DPM++ 2M SDE Heun": "Exponential",
    "DPM++ 2S a": "Karras",
    "DPM++ 3M SDE": "Exponential",
    "Euler a": "Uniform",
    "Euler": "Uniform",
    "LMS": "Uniform",
    "Heun": "Uniform",
    "DPM2": "Karras",
    "DPM2 a": "Karras",
    "Restart": "Karras",
}


@pytest.mark.parametrize(("name", "expected"), V19_AUTOMATIC.items())
def test_automatic_is_a1111_19s_default(name: str, expected: str) -> None:
    assert resolve_sampler(SamplerName(name), AUTO) == (name, expected)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DPM++ 2M", ("DPM++ 2M", "Uniform")),
        ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M SDE", ("DPM++ 2M SDE", "Uniform")),
        ("DPM++ 2M SDE Heun Exponential", ("DPM++ 2M SDE Heun", "Exponential")),
        ("DPM++ 3M SDE Karras", ("DPM++ 3M SDE", "Karras")),
        ("Restart", ("Restart", "Karras")),
        ("UniPC", ("UniPC", "Uniform")),
    ],
)
def test_without_a_schedule_type_names_keep_a1111_18_meaning(name: str, expected: tuple[str, str]) -> None:
    assert resolve_sampler(SamplerName(name), None) == expected


def test_suffix_wins_over_the_schedule_type_and_explicit_types_apply() -> None:
    assert resolve_sampler(SamplerName("DPM++ 2M Karras"), SchedulerName("Exponential")) == ("DPM++ 2M", "Karras")
    assert resolve_sampler(SamplerName("Euler a"), SchedulerName("SGM Uniform")) == ("Euler a", "SGM Uniform")
    assert resolve_sampler(SamplerName("Euler SGM Uniform"), None) == ("Euler", "SGM Uniform")  # not "Euler SGM"


def test_every_name_and_label_resolves() -> None:
    for name in SAMPLER_NAMES:
        for label in (None, *SCHEDULER_NAMES):
            base, schedule = resolve_sampler(name, label)
            assert schedule in SCHEDULER_NAMES[1:]
            assert sampler_algorithm(sampler_with_schedule(name, label)) == base
            assert resolve_sampler(sampler_with_schedule(name, label), None) == (base, schedule)


def test_normalizing_schedule_types() -> None:
    assert normalize_scheduler_name("karras") == "Karras"
    assert normalize_scheduler_name("sgm_uniform") == "SGM Uniform"
    assert normalize_scheduler_name("SGMUniform") == "SGM Uniform"
    assert normalize_scheduler_name("align your steps") == "Align Your Steps"
    assert normalize_scheduler_name("kl-optimal") == "KL Optimal"
    assert normalize_scheduler_name("Lineal") is None
    assert normalize_scheduler_name(3) is None
    assert normalize_sampler_name("Euler a Beta") == "Euler a Beta"
    assert sampler_algorithm("DPM adaptive Karras") == "DPM adaptive"
    assert sampler_algorithm("nope") is None


def test_infotext_writes_the_schedule_type_only_when_one_was_sent() -> None:
    assert infotext_sampler(SamplerName("DPM++ 2M SDE Karras"), None) == ("DPM++ 2M SDE Karras", None)
    assert infotext_sampler(SamplerName("DPM++ 2M"), AUTO) == ("DPM++ 2M", "Karras")
    assert infotext_sampler(SamplerName("DPM++ 2M Karras"), AUTO) == ("DPM++ 2M", "Karras")
