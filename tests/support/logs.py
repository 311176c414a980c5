"""Checks on the operator's log lines."""

from __future__ import annotations

import logging
import re

import pytest


def assert_load_lines(
    caplog: pytest.LogCaptureFixture, kind: str, names: list[str], tiers: list[str] | None = None
) -> list[logging.LogRecord]:
    """The INFO lines of ``kind`` model loads caplog holds, one per name in order: ``<kind> <name> loaded in <s>
    (tier <tier>)`` (checkpoints: ``model <name> loaded in <s> (tier <tier>, ...)``), their seconds also in
    ``load_seconds`` and their tier in ``tier``."""
    records = [r for r in caplog.records if getattr(r, "model_kind", None) == kind]
    assert [r.levelno for r in records] == [logging.INFO] * len(names)
    assert [r.model for r in records] == names  # type: ignore[attr-defined]
    word = "model" if kind == "checkpoint" else kind
    for record in records:
        message = record.getMessage()
        found = re.fullmatch(rf"{re.escape(word)} (.+) loaded in (\d+\.\d\d) s \(tier (\w+)(?:, .+)?\)", message)
        assert found is not None, message
        assert found[1] == record.model  # type: ignore[attr-defined]
        seconds = float(found[2])
        assert 0 <= seconds < 120
        assert abs(seconds - record.load_seconds) <= 0.006  # type: ignore[attr-defined]
        assert found[3] == getattr(record, "tier", None)
    if tiers is not None:
        assert [r.tier for r in records] == tiers  # type: ignore[attr-defined]
    return records
