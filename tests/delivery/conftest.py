"""Fixtures for the delivery tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.support.webhook_receiver import Receiver, running_receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as state:
        yield state
