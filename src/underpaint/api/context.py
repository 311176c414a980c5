"""Per-app state shared by the route modules, computed once in ``create_app`` (nothing heavy per request)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from underpaint.api.auth import Caller, KeyAuth
from underpaint.api.errors import ApiError
from underpaint.services import Services
from underpaint.tasks.types import ImageRecord

UrlResolver = Callable[[ImageRecord, int], str]


@dataclass
class ApiContext:
    services: Services
    auth: KeyAuth
    ttl: int
    public_base_url: str | None
    url_resolvers: dict[str, UrlResolver] = field(default_factory=dict)

    @classmethod
    def build(cls, services: Services) -> ApiContext:
        settings = services.settings
        base = settings.public_base_url.rstrip("/") if settings.public_base_url else None
        return cls(
            services=services,
            auth=KeyAuth(settings),
            ttl=int(settings.image_url_ttl),
            public_base_url=base,
            url_resolvers=dict(services.extras.get("url_resolvers") or {}),
        )

    def caller(self, request: Request) -> Caller:
        return self.auth.authenticate(request.headers.get("authorization"))

    def base_url(self, request: Request) -> str:
        return self.public_base_url or str(request.base_url).rstrip("/")

    def url_for(self, base_url: str) -> Callable[[ImageRecord], str]:
        """Image record → absolute download URL, by the backend that holds the image."""
        storage = self.services.storage
        ttl = self.ttl

        def url(image: ImageRecord) -> str:
            if image.backend == storage.name:
                return storage.url(image.key, ttl, base_url)
            resolver = self.url_resolvers.get(image.backend)
            if resolver is None:
                raise LookupError(f"no URL resolver for image backend {image.backend!r}")
            return resolver(image, ttl)

        return url


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


def json_ok(body: Any) -> JSONResponse:
    return JSONResponse(body, status_code=200)
