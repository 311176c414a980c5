from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.server import LiveServer, make_png


@pytest.fixture
def png_b64() -> str:
    return base64.b64encode(make_png()).decode()


@pytest.fixture
def live_server(tmp_path: Path, tiny_models_dir: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path / "data", tiny_models_dir).start()
    try:
        yield server
    finally:
        server.stop()
