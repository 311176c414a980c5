"""The task store's backends: every store test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.services import postgres_schema_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sub' / 'tasks.db'}"
        return
    # No skip: an unreachable server makes this fixture (and so the test) fail.
    with postgres_schema_url("up_") as url:
        yield url
