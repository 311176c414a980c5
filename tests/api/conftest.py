"""Fixtures of the API tests; the plain helpers live in tests/support/api.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from tests.support.api import (
    KEY_A,
    Submit,
    auth,
    b64,
    body,
    image_bytes,
    make_services,
    write_models,
)

from underpaint.api.app import create_app
from underpaint.services import Services


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def png_b64() -> str:
    return b64(image_bytes())


@pytest.fixture
def services(models_dir: Path, tmp_path: Path) -> Iterator[Services]:
    services = make_services(models_dir, tmp_path)
    yield services
    close = getattr(services.store, "close", None)
    if close is not None:
        close()


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(services), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def submit(client: TestClient, png_b64: str) -> Submit:
    """POST a request (request fields as kwargs; ``extra=`` for the extra object); returns the response."""

    def post(extra: Any = ..., key: str = KEY_A, image: str | None = None, **request: Any) -> httpx.Response:
        payload = body(png_b64 if image is None else image, **request)
        if extra is not ...:
            payload["extra"] = extra
        response: httpx.Response = client.post("/v3/async/img2img", json=payload, headers=auth(key))
        return response

    return post
