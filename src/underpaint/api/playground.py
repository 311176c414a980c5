"""The browser-facing routes: the playground page, the API reference page and ``/openapi.json``.

* ``GET /`` redirects to ``GET /playground``: a page over the public API only (the key is typed in and kept in
  the browser), shipped as plain files in ``api/static/`` (package data, no front-end build step). The names the
  page offers that are not in ``GET /v3/model`` (samplers, ControlNet preprocessors) are rendered into it from
  ``underpaint.vocabulary``, so the page and the validator share one list.
* ``GET /docs``: a self-contained reference page (no CDN assets: it works offline) that renders
  ``GET /openapi.json``, which ``api/openapi.py`` builds from the pydantic models.

Every file is read once when the app is built; the pages carry a Content-Security-Policy that allows only this
origin's scripts and styles.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from underpaint.api.context import error_response
from underpaint.api.openapi import build_openapi
from underpaint.vocabulary import PREPROCESSOR_NAMES, SAMPLER_NAMES
from underpaint.wire.errors import ApiError

PLAYGROUND_PATH = "/playground"
DOCS_PATH = "/docs"
OPENAPI_PATH = "/openapi.json"
ASSETS = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "inpaint.js": "text/javascript; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",
}
# Images may live on S3 (presigned URLs on another origin); everything else comes from this origin.
CSP = (
    "default-src 'self'; img-src 'self' data: blob: https: http:; connect-src 'self' https: http:; "
    "script-src 'self'; style-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


_CONVERTER = re.compile(r":\w+}")  # "/v3/files/{key:path}" is "/v3/files/{key}" in OpenAPI


def _read(name: str) -> bytes:
    return resources.files("underpaint.api").joinpath("static", name).read_bytes()


def vocabulary_json() -> str:
    """The names the page needs that ``GET /v3/model`` does not list, as JSON safe inside a <script> element."""
    data = {"samplers": list(SAMPLER_NAMES), "preprocessors": sorted(PREPROCESSOR_NAMES)}
    return json.dumps(data).replace("<", "\\u003c")


def install_playground(app: FastAPI) -> None:
    assets = {name: _read(name) for name in ASSETS}
    version = hashlib.sha256(b"".join(assets[n] for n in sorted(assets))).hexdigest()[:12]
    pages = {
        PLAYGROUND_PATH: _read("playground.html")
        .decode()
        .replace("__VOCABULARY__", vocabulary_json())
        .replace("__ASSET_VERSION__", version)
        .encode(),
        DOCS_PATH: _read("docs.html").decode().replace("__ASSET_VERSION__", version).encode(),
    }
    page_headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    openapi: dict[str, Any] = {}

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse(PLAYGROUND_PATH, status_code=307)

    @app.get(PLAYGROUND_PATH, include_in_schema=False)
    def playground() -> Response:
        return Response(pages[PLAYGROUND_PATH], media_type="text/html; charset=utf-8", headers=page_headers)

    @app.get(DOCS_PATH, include_in_schema=False)
    def docs() -> Response:
        return Response(pages[DOCS_PATH], media_type="text/html; charset=utf-8", headers=page_headers)

    @app.get(PLAYGROUND_PATH + "/{name}", include_in_schema=False)
    def asset(name: str, request: Request) -> Response:
        if name not in assets:
            return error_response(ApiError(404, "API_NOT_FOUND", f"no API at GET {request.url.path}"))
        # The pages link assets with ?v=<content hash>, so a cached copy is never stale.
        cache = "public, max-age=31536000, immutable" if request.query_params.get("v") == version else "no-cache"
        return Response(
            assets[name], media_type=ASSETS[name], headers={"Cache-Control": cache, "X-Content-Type-Options": "nosniff"}
        )

    @app.get(OPENAPI_PATH, include_in_schema=False)
    def openapi_json() -> Response:
        # Built on first use, when every route (metrics, extensions added after this module) is in place.
        if not openapi:
            paths = [getattr(route, "path", None) for route in app.routes]
            served = {_CONVERTER.sub("}", path) for path in paths if isinstance(path, str)}
            openapi.update(build_openapi(served))
        return JSONResponse(openapi)
