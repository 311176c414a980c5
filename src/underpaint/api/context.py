"""Per-app state shared by the route modules, computed once in ``create_app`` (nothing heavy per request)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from underpaint.api.auth import Caller, KeyAuth
from underpaint.services import Services
from underpaint.storage.urls import UrlFor
from underpaint.wire.errors import ApiError


@dataclass(frozen=True)
class ApiContext:
    services: Services
    auth: KeyAuth
    ttl: int
    public_base_url: str | None

    @classmethod
    def build(cls, services: Services) -> ApiContext:
        settings = services.settings
        base = settings.public_base_url.rstrip("/") if settings.public_base_url else None
        return cls(
            services=services,
            auth=KeyAuth(settings),
            ttl=int(settings.image_url_ttl),
            public_base_url=base,
        )

    def caller(self, request: Request) -> Caller:
        return self.auth.authenticate(request.headers.get("authorization"))

    def base_url(self, request: Request) -> str:
        return self.public_base_url or str(request.base_url).rstrip("/")

    def url_for(self, base_url: str) -> UrlFor:
        return self.services.image_urls.resolver(base_url)


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


def json_ok(body: Any) -> JSONResponse:
    return JSONResponse(body, status_code=200)
