from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.server import LiveServer, make_png


@pytest.fixture
def png_b64() -> str:
    return base64.b64encode(make_png()).decode()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    """One ``underpaint serve`` (API and its embedded worker process) for a whole file: starting one imports torch
    in a new process and loads the models again. A test that needs a fresh server (killing or restarting it, an
    empty queue from the start) builds its own ``LiveServer``."""
    server = LiveServer(tmp_path_factory.mktemp("live") / "data", tiny_models_dir).start()
    try:
        yield server
    finally:
        server.stop()
