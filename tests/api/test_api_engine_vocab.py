"""The API keeps torch-free copies of engine vocabularies; they must not drift from the engine's."""

from __future__ import annotations

import pytest

from underpaint.api import schemas
from underpaint.engine import samplers


def test_sampler_names_match_the_engine() -> None:
    assert tuple(schemas.SAMPLER_NAMES) == tuple(samplers.SAMPLER_NAMES)


@pytest.mark.parametrize("name", ["euler a", " DPM++ 2M  Karras ", "DPM++ Karras", "dpm fast", "UNIPC", "Nope"])
def test_sampler_normalization_matches_the_engine(name: str) -> None:
    assert schemas.normalize_sampler_name(name) == samplers.normalize_sampler_name(name)
